"""The scheduler: which requests advance by how many tokens in the next step.

One rule covers prefill, decode, chunked prefill and prefix-cache hits (as vLLM's V1
scheduler): every request has `num_computed_tokens` and a target `num_tokens`, and each
step hands out at most `max_num_batched_tokens` tokens over at most `max_num_seqs`
requests. Running requests go first; when the KV pool runs dry the most recently admitted
running request is preempted (blocks freed, recomputed later from the front of the queue).

Policies (vLLM's scheduling_policy): "fcfs" serves requests in arrival order; "priority"
orders the waiting queue and the running batch by (priority, arrival), preempts the
lowest-priority running request when the pool runs dry, and preempts running requests of
lower priority than the head of the queue when it cannot otherwise be admitted.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Collection, Iterable, Optional

from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.ngram import NgramProposer
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.state_cache import boundary as state_boundary


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    start: int  # first position computed this step (= num_computed_tokens before the step)
    num_tokens: int  # how many tokens the step computes for it
    block_ids: list[int]  # the request's block table (live list owned by the KV cache manager)
    samples: bool = False  # whether the step yields the request's next token (its chunk reaches the end)
    # Speculative decoding: draft tokens computed after the request's last token this step
    # (num_tokens = 1 + len(drafts)); the step verifies them.
    drafts: list[int] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class StepUpdate:
    """What a step changed, for the output side: child request id -> its new tokens, and
    child request id -> (finish_reason, stop_reason) for those it finished."""

    new_tokens: dict[str, list[int]] = field(default_factory=dict)
    finished: dict[str, tuple] = field(default_factory=dict)


_FINISHED = RequestStatus.FINISHED_STOPPED  # statuses from here on are finished
SCHEDULING_POLICIES = ("fcfs", "priority")


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
        proposer: Optional["NgramProposer"] = None,
        max_loras: int = 0,
        policy: str = "fcfs",
        long_prefill_token_threshold: int = 0,
        fork_prompts: bool = True,
    ) -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {policy!r}.")
        self.kv = kv
        self.by_priority = policy == "priority"
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        # At most this many prompt tokens of a request a step (0: no limit; chunked prefill only).
        self.long_prefill = long_prefill_token_threshold
        # n > 1: siblings share their leader's prompt blocks; off where a request's state cannot
        # resume part-way into its prompt from blocks alone (models with per-request states):
        # each is admitted on its own, and hits the state saved from the leader's prompt.
        self.fork_prompts = fork_prompts
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self._forked_waiting: list[Request] = []  # siblings queued while holding shared blocks
        self.num_preemptions = 0
        self.proposer = proposer  # speculative decoding
        self.num_draft_tokens = self.num_accepted_tokens = 0
        self.num_drafts = 0  # steps a request ran drafts in (vLLM's spec_decode_num_drafts)
        self.accepted_per_pos: list[int] = []  # [j]: drafts accepted at position j of a step's drafts
        self.max_loras = max_loras  # distinct LoRA adapters a batch may hold (0: LoRA off)
        # A chunk never ends inside an image (Gemma 3: an image's tokens attend to each other
        # both ways, so all of them must be in the cache when any of them is computed).
        self.whole_images = False
        # False: waiting requests stay queued (AsyncLLM.pause_generation "wait"); requests
        # preempted from the running batch are still taken back.
        self.admitting = True

    # ---- queue management -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request; its pending siblings (n > 1) join once it has computed its prompt."""
        ids = [req.request_id] + [s.request_id for s in req.pending_siblings]
        taken = [i for i in ids if i in self.requests]
        if taken:
            raise ValueError(f"request_id {taken[0]!r} is already in use.")
        for sib in req.pending_siblings:
            sib.leader = req
            self.requests[sib.request_id] = sib
        self.requests[req.request_id] = req
        self._enqueue(req)

    def _enqueue(self, req: Request, front: bool = False) -> None:
        """Queue a request: last (front=True: first, to resume) under FCFS; under the priority
        policy in key order, ahead of (front) or behind its equals."""
        if not self.by_priority:
            self.waiting.appendleft(req) if front else self.waiting.append(req)
            return
        keys = [r.sort_key for r in self.waiting]
        at = (bisect.bisect_left if front else bisect.bisect_right)(keys, req.sort_key)
        self.waiting.insert(at, req)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (abort, or stop on a stop string) requests wherever they are."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished():
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            elif req.leader is not None and req in req.leader.pending_siblings:
                req.leader.pending_siblings.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._release(req)
            done.append(req)
        return done

    def _release(self, req: Request) -> None:
        self.kv.free(req)
        if self.proposer is not None:
            self.proposer.forget(req.request_id)
            observe = getattr(self.proposer, "observe_finished", None)  # (suffix decoding learns from outputs)
            if observe is not None:
                observe(req)
        self.requests.pop(req.request_id, None)
        self._finished_ids.add(req.request_id)

    def pop_finished_ids(self) -> set[str]:
        """Requests finished (or aborted) since the last call, for the runner to forget."""
        ids, self._finished_ids = self._finished_ids, set()
        return ids

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def may_draft(self) -> bool:
        """Whether the next step may run drafts (disable_by_batch_size counts the running
        batch). Drafts follow a request's last token, so under async scheduling the engine
        lands the step in flight first; a request whose last token is still in flight decodes
        plainly."""
        if self.proposer is None:
            return False
        limit = self.proposer.cfg.disable_by_batch_size
        return limit is None or len(self.running) <= limit

    # ---- the step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        plan: list[tuple[Request, int]] = []
        drafts: dict[str, list[int]] = {}

        i = 0
        if self.by_priority:  # best first: the budget goes to them, and the last is the victim
            self.running.sort(key=Request.sort_key.fget)
        running = self.running
        speculating = self.may_draft()
        while i < len(running) and budget > 0:
            req = running[i]
            inflight = req.num_inflight
            if inflight and req.capped_by_inflight(self.max_model_len):
                i += 1  # its in-flight token is its last: it finishes when that lands
                continue
            left = len(req.all_token_ids) + inflight - req.num_computed_tokens
            n = min(left, budget)
            if self.long_prefill:  # (a decode's one token is never above it)
                n = min(n, self.long_prefill)
            if self.whole_images and req.mm_features:
                n = self._whole_images(req, req.num_computed_tokens, n)
                if n == 0:  # the rest of an image does not fit this step's budget: next step
                    i += 1
                    continue
            n = self._state_cut(req, req.num_computed_tokens, n)
            self.kv.release_out_of_window(req, req.num_computed_tokens)
            if left == 1 and speculating and not inflight and req.speculates:
                # A draft model drafts once the slots are allocated, for all requests at once.
                batched = getattr(self.proposer, "batched", False)
                d = [0] * self._draft_room(req, budget - 1) if batched else self._drafts(req, budget - 1)
                if d and self.kv.allocate_slots(req, 1 + len(d)):  # no room for drafts: decode plainly
                    drafts[req.request_id] = d
                    n = 1 + len(d)
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # it preempted itself: nothing behind it is left either
            plan.append((req, n))
            budget -= n
            i += 1

        if not out.preempted:
            now = time.monotonic()
            loras = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
            while self.waiting and budget > 0:
                req = self.waiting[0]
                if not self.admitting and req.status != RequestStatus.PREEMPTED:
                    break
                if len(self.running) >= self.max_num_seqs:
                    if self._preempt_for(req, plan, drafts, out):
                        budget = self.max_num_batched_tokens - sum(n for _, n in plan)
                        continue
                    break
                lora = req.lora_request
                if lora is not None and lora.lora_int_id not in loras and len(loras) >= self.max_loras:
                    break  # first come, first served: it waits until an adapter's requests are done
                forked = self.kv.holds_blocks(req)
                if forked:  # a sibling forked from its leader's prompt
                    hits, num_hit = [], req.num_computed_tokens
                else:
                    hits, num_hit = self.kv.get_computed_blocks(req)
                n = req.num_tokens - num_hit
                if self.long_prefill:
                    n = min(n, self.long_prefill)
                if n > budget:
                    if not self.enable_chunked_prefill:
                        break
                    n = budget
                    if self.whole_images and req.mm_features:
                        n = self._whole_images(req, num_hit, n)
                        if n == 0:
                            break
                n = self._state_cut(req, num_hit, n)
                if not self.kv.allocate_slots(req, n, hits):
                    if self._preempt_for(req, plan, drafts, out):
                        budget = self.max_num_batched_tokens - sum(n for _, n in plan)
                        continue
                    break
                self.waiting.popleft()
                self.running.append(req)
                if lora is not None:
                    loras.add(lora.lora_int_id)
                req.status = RequestStatus.RUNNING
                if not forked:
                    self.kv.count_prefix_lookup(req, num_hit)
                req.num_computed_tokens = num_hit
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                plan.append((req, n))
                budget -= n

        if getattr(self.proposer, "batched", False):
            planned = {r.request_id: r for r, _ in plan}
            items = [(planned[rid], self.kv.block_ids(planned[rid]), len(d)) for rid, d in drafts.items()
                     if rid in planned]
            behind = getattr(self.proposer, "behind", None)  # an EAGLE head takes waiting features
            if behind is not None:
                items += [(r, self.kv.block_ids(r), 0) for r, _ in plan if r.request_id not in drafts and behind(r)]
            if items:
                drafts = self.proposer.propose_batch(items)
        for req, n in plan:
            start = req.num_computed_tokens
            samples = start + n >= len(req.all_token_ids) + req.num_inflight
            out.scheduled.append(ScheduledRequest(req, start, n, self.kv.block_ids(req), samples,
                                                  drafts.get(req.request_id, [])))
            req.num_computed_tokens = start + n
            if samples:
                req.num_inflight += 1
        return out

    def _state_cut(self, req: Request, start: int, n: int) -> int:
        """Models with saved states: a prompt chunk that would run past the prompt's state
        boundary ends there, so that a step leaves the state to save (engine/state_cache.py)."""
        if self.kv.state_cache is None:
            return n
        b = state_boundary(req.num_prompt_tokens, self.kv.block_size)
        return b - start if start < b < start + n else n

    @staticmethod
    def _whole_images(req: Request, start: int, n: int) -> int:
        """n shortened so that the chunk [start, start + n) does not end inside an image (0 if
        an image it must finish does not fit)."""
        end = start + n
        for f in req.mm_features:
            if f.offset < end < f.offset + f.length:
                end = f.offset if f.offset > start else start
        return end - start

    def _draft_room(self, req: Request, budget: int) -> int:
        """How many draft tokens a decoding request may take, within its max_tokens, the
        context and `budget` (the last token a step yields is always the model's own)."""
        cfg = self.proposer.cfg
        room = min(budget, req.max_tokens - len(req.output_token_ids) - 1,
                   min(self.max_model_len, cfg.max_model_len or self.max_model_len) - len(req.all_token_ids) - 1)
        return max(0, min(room, cfg.num_speculative_tokens))

    def _drafts(self, req: Request, budget: int) -> list[int]:
        room = self._draft_room(req, budget)
        d = self.proposer.propose(req, room) if room > 0 else []
        if d and req.grammar is not None:  # drafts its grammar refuses would only fall
            d = d[: req.grammar.valid_prefix(d)]
        return d

    def _preempt(self, req: Request) -> None:
        # Forked siblings still waiting pin their leader's prompt blocks; under memory
        # pressure let them go (they recompute, or hit the prefix cache, when admitted).
        for w in self._forked_waiting:
            if w.status == RequestStatus.WAITING and self.kv.holds_blocks(w):
                self.kv.free(w)
                w.num_computed_tokens = 0
        self._forked_waiting.clear()
        self.kv.free(req)
        if self.proposer is not None:  # a draft model's KV went with the blocks
            self.proposer.forget(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(req, front=True)

    def preempt_all(self) -> list[Request]:
        """Every running request back to the front of the queue, in its order, its blocks
        freed: it recomputes its tokens when admitted again (after a weight update)."""
        victims = list(self.running)
        for req in reversed(victims):
            self._preempt(req)
        self.running.clear()
        return victims

    def _preempt_for(self, head: Request, plan: list, drafts: dict, out: SchedulerOutput) -> bool:
        """Priority policy: make room for the head of the queue by preempting the running request
        of lowest priority, if it is of strictly lower priority than the head (its place in this
        step's plan, if any, is dropped). False when there is none."""
        if not self.by_priority or not self.running:
            return False
        victim = max(self.running, key=Request.sort_key.fget)
        if victim.priority <= head.priority:
            return False
        self.running.remove(victim)
        plan[:] = [(r, n) for r, n in plan if r is not victim]
        drafts.pop(victim.request_id, None)
        self._preempt(victim)
        out.preempted.append(victim)
        return True

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int],
                           accepted: Optional[dict[str, list[int]]] = None,
                           pooled: Collection[str] = ()) -> StepUpdate:
        """Record the step's results: publish written blocks, append sampled tokens, stop
        finished requests.

        With async scheduling the next step is already scheduled when this runs, so a request
        may meanwhile have been preempted (its token still counts: it recomputes with it) or
        finished (aborted, or stopped by the previous step: the token is dropped).
        `accepted`: for requests that ran drafts, the draft tokens the model confirmed (the
        sampled token follows them); the rejected drafts' positions count as not computed.
        `pooled`: embedding requests whose prompt the step completed; they end here.
        Runs for every request at every step: kept lean."""
        upd = StepUpdate()
        new_tokens, finished = upd.new_tokens, upd.finished
        bs = self.kv.block_size
        finished_any = False
        for s in out.scheduled:
            req = s.request
            if s.samples:
                req.num_inflight -= 1
            status = req.status
            if status >= _FINISHED:
                continue
            rid = req.request_id
            token = sampled.get(rid)
            if s.drafts:  # speculative: confirmed drafts first, then the sampled token
                confirmed = accepted.get(rid, []) if accepted else []
                req.num_computed_tokens -= len(s.drafts) - len(confirmed)
                self.num_draft_tokens += len(s.drafts)
                self.num_accepted_tokens += len(confirmed)
                self.num_drafts += 1
                per_pos = self.accepted_per_pos
                if len(per_pos) < len(s.drafts):
                    per_pos += [0] * (len(s.drafts) - len(per_pos))
                for j in range(len(confirmed)):
                    per_pos[j] += 1
                if token is not None and confirmed and self._append_many(s, confirmed, new_tokens, finished):
                    continue  # a confirmed draft ended it: the rest are dropped
            # A token its grammar refuses (only when every token was masked: min_tokens banning
            # the grammar's only way out) is dropped, and the request ends.
            rejected = token is not None and req.grammar is not None and not req.grammar.accept(token)
            if token is not None and not rejected:
                req.append_output_token(token)
            running = status == RequestStatus.RUNNING
            # Publish the blocks filled by known tokens (the next step may be writing one more).
            if running and min(req.num_computed_tokens, len(req.all_token_ids)) // bs > req.num_published_blocks:
                self.kv.cache_blocks(req, min(req.num_computed_tokens, len(req.all_token_ids)))
            if pooled and rid in pooled:  # its vector goes out with the step's results
                self._end_landed(req, RequestStatus.FINISHED_STOPPED, running)
                finished_any |= running
                continue
            if token is None:
                continue  # a prefill chunk that does not reach the end of the prompt
            if req.pending_siblings:
                self._fork_siblings(req, share=running)
            if rejected:
                stop = RequestStatus.FINISHED_STOPPED
            else:
                new_tokens.setdefault(rid, []).append(token)
                stop = self._check_stop(req, token)
            if stop is not None:
                self._end_landed(req, stop, running)
                finished_any |= running
                finished[rid] = (stop.finish_reason, req.stop_reason)
        if finished_any:
            self.running = [r for r in self.running if r.status < _FINISHED]
        return upd

    def _end_landed(self, req: Request, status: RequestStatus, running: bool) -> None:
        """Finish a request its landed step ended. A running one leaves `running` in one sweep
        after the step (the caller's); one preempted meanwhile is waiting to recompute."""
        if not running:
            self.waiting.remove(req)
        req.status = status
        self._release(req)

    def _append_many(self, s: ScheduledRequest, tokens: list[int], new_tokens: dict, finished: dict) -> bool:
        """Append confirmed draft tokens one by one with the stop checks of each; True if one of
        them finished the request (it is then released and the rest dropped)."""
        req = s.request
        got = new_tokens.setdefault(req.request_id, [])
        for t in tokens:
            # (a confirmed draft was checked under the grammar's mask: the grammar takes it)
            refused = req.grammar is not None and not req.grammar.accept(t)
            if not refused:
                req.append_output_token(t)
                got.append(t)
            stop = RequestStatus.FINISHED_STOPPED if refused else self._check_stop(req, t)
            if stop is not None:
                if req.status == RequestStatus.RUNNING:
                    self.running.remove(req)
                else:
                    self.waiting.remove(req)
                req.status = stop
                self._release(req)
                finished[req.request_id] = (stop.finish_reason, req.stop_reason)
                return True
        return False

    def _fork_siblings(self, leader: Request, share: bool = True) -> None:
        """The leader's prompt KV is written: its siblings share the full prompt blocks and
        compute only the rest (at least one token, so each samples its own first token).
        share=False (the leader was preempted meanwhile): they start from scratch."""
        shared = (leader.num_prompt_tokens - 1) // self.kv.block_size if share and self.fork_prompts else 0
        # Keep the list to siblings still waiting (admitted or finished ones drop out).
        self._forked_waiting = [w for w in self._forked_waiting if w.status == RequestStatus.WAITING]
        for sib in reversed(leader.pending_siblings):
            if shared:
                self.kv.fork(leader, sib, shared)
                sib.num_computed_tokens = shared * self.kv.block_size
                self._forked_waiting.append(sib)
            self._enqueue(sib, front=True)
        leader.pending_siblings = []

    def _check_stop(self, req: Request, token: int) -> Optional[RequestStatus]:
        sp = req.sampling_params
        n_out = len(req.output_token_ids)
        if n_out >= sp.min_tokens:
            if token in sp._eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in sp.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.grammar is not None and req.grammar.is_terminated:  # complete: nothing may follow
            return RequestStatus.FINISHED_STOPPED
        if n_out >= req.max_tokens or len(req.all_token_ids) >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None
