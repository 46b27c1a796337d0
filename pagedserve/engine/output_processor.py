"""The output side of the loop: incremental detokenization, stop strings, logprobs and
RequestOutput assembly (cumulative, delta or final-only), one state per user request with
one sequence per sample (n > 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.request import Request
from pagedserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.worker.runner_output import ModelRunnerOutput, PositionLogprobs


@dataclass
class SequenceState:
    index: int
    request: Request
    detok: Optional[IncrementalDetokenizer]
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    text_end: Optional[int] = None  # where a stop string cut the text
    token_end: Optional[int] = None  # where it cut the tokens (several can land in one step)
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    sent_tokens: int = 0  # for DELTA outputs
    sent_text: int = 0
    touched: bool = False  # got a token or finished in the current step

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def visible_text(self, params: SamplingParams) -> str:
        if self.detok is None:
            return ""
        text = self.detok.text if self.text_end is None else self.detok.text[: self.text_end]
        if not self.finished and params.stop and not params.include_stop_str_in_output:
            # Hold back what could still turn out to be the start of a stop string.
            text = text[: max(0, len(text) - (params.max_stop_len - 1))]
        return text


@dataclass
class RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: Optional[list[int]]  # None: the prompt was given as embeddings
    params: SamplingParams
    seqs: list[SequenceState]
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = 0
    extra: dict = field(default_factory=dict)
    lora_request: Optional[Any] = None  # lora/request.py LoRARequest

    @property
    def finished(self) -> bool:
        seqs = self.seqs
        if len(seqs) == 1:  # the common case, on the per-step path
            return seqs[0].finish_reason is not None
        return all(s.finish_reason is not None for s in seqs)


def find_stop_string(text: str, new_chars: int, stops: list[str], include: bool) -> Optional[tuple[str, int]]:
    """The earliest stop string ending in the last `new_chars` characters of `text`, and
    where to cut the text; None if there is none."""
    best: Optional[tuple[str, int, int]] = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        i = text.find(stop, start)
        if i != -1 and (best is None or i < best[1]):
            best = (stop, i, i + len(stop) if include else i)
    return None if best is None else (best[0], best[2])


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self.seq_of: dict[str, tuple[RequestState, SequenceState]] = {}  # child request id -> state
        self._token_text: dict[int, str] = {}

    def add(self, state: RequestState) -> None:
        self.states[state.request_id] = state
        for seq in state.seqs:
            self.seq_of[seq.request.request_id] = (state, seq)
        if state.params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]

    def child_ids(self, request_id: str) -> list[str]:
        st = self.states.get(request_id)
        return [s.request.request_id for s in st.seqs] if st else []

    def remove(self, request_id: str) -> None:
        st = self.states.pop(request_id, None)
        if st is not None:
            for seq in st.seqs:
                self.seq_of.pop(seq.request.request_id, None)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _logprob_dict(self, p: PositionLogprobs) -> dict[int, Logprob]:
        d = {p.token_id: Logprob(p.logprob, p.rank, self.token_text(p.token_id))}
        for rank, (tid, lp) in enumerate(zip(p.topk_ids, p.topk_logprobs), start=1):
            if tid not in d:
                d[tid] = Logprob(lp, rank, self.token_text(tid))
        return d

    def process(self, new_tokens: dict[str, list[int]], finished: dict[str, tuple[str, Any]],
                runner_out: ModelRunnerOutput) -> tuple[list[RequestOutput], list[str]]:
        """Fold one step into the states. `new_tokens`: child id -> tokens it got;
        `finished`: child id -> (finish_reason, stop_reason) the scheduler decided. Returns
        the outputs to emit and the child ids a stop string ended (the scheduler must stop
        them)."""
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        for rid, plps in runner_out.prompt_logprobs.items():
            entry = self.seq_of.get(rid)
            if entry is not None and entry[0].prompt_logprobs is not None:
                entry[0].prompt_logprobs.extend(self._logprob_dict(p) for p in plps)
        for rid, tokens in new_tokens.items():
            entry = self.seq_of.get(rid)
            if entry is None:
                continue
            state, seq = entry
            seq.touched = True
            touched[state.request_id] = state
            params = seq.request.sampling_params
            lp = runner_out.logprobs.get(rid)
            if lp is not None:
                if seq.logprobs is None:
                    seq.logprobs, seq.cumulative_logprob = [], 0.0
                # (speculative: one per token emitted; those after a stop were dropped)
                for p in (lp[: len(tokens)] if isinstance(lp, list) else [lp]):
                    seq.logprobs.append(self._logprob_dict(p))
                    seq.cumulative_logprob += p.logprob
            if seq.detok is not None:
                # A stop token (EOS, stop_token_ids) that ends the request stays in token_ids
                # but not in the text, unless include_stop_str_in_output (as vLLM).
                fin = finished.get(rid)
                if fin is not None and fin[0] == "stop" and not params.include_stop_str_in_output:
                    tokens = tokens[:-1]
                # Several tokens (speculative decoding) go in one by one when a stop string may
                # end the text among them: the tokens after it are dropped.
                pieces = [tokens] if not params.stop or len(tokens) <= 1 else [[t] for t in tokens]
                hit = None
                for j, piece in enumerate(pieces):
                    new_text = seq.detok.add_tokens(piece)
                    if rid in finished and j == len(pieces) - 1:
                        new_text += seq.detok.finish()
                    if params.stop and new_text:
                        hit = find_stop_string(seq.detok.text, len(new_text), params.stop,
                                               params.include_stop_str_in_output)
                        if hit is not None:
                            if len(pieces) > 1:
                                seq.token_end = end = len(seq.request.output_token_ids) - (len(pieces) - 1 - j)
                                if seq.logprobs is not None:  # the dropped tokens' logprobs leave the sum
                                    ids = seq.request.output_token_ids
                                    seq.cumulative_logprob = sum(d[t].logprob for d, t in zip(seq.logprobs[:end], ids))
                            break
                if hit is not None:
                    seq.stop_reason, seq.text_end = hit
                    seq.finish_reason = "stop"
                    if rid not in finished:
                        stopped.append(rid)
                    continue
            if rid in finished:
                seq.finish_reason, seq.stop_reason = finished[rid]
        for rid, (reason, stop_reason) in finished.items():  # finished without a token (abort)
            entry = self.seq_of.get(rid)
            if entry is not None and not entry[1].finished:
                entry[1].finish_reason, entry[1].stop_reason = reason, stop_reason
                entry[1].touched = True
                touched[entry[0].request_id] = entry[0]
        outputs = []
        final_only = RequestOutputKind.FINAL_ONLY
        for state in touched.values():
            done = state.finished
            if done or state.params.output_kind != final_only:
                outputs.append(self._make_output(state, done))
            for seq in state.seqs:
                seq.touched = False
            if done:
                self.remove(state.request_id)
        return outputs, stopped

    def _make_output(self, state: RequestState, finished: bool) -> RequestOutput:
        delta = state.params.output_kind == RequestOutputKind.DELTA
        completions = []
        for seq in state.seqs:
            if delta and not seq.touched:
                continue
            text = seq.visible_text(state.params)
            ids = seq.request.output_token_ids
            logprobs = seq.logprobs
            if seq.token_end is not None:  # a stop string among a step's tokens: those after it go
                ids = ids[: seq.token_end]
                logprobs = logprobs[: seq.token_end] if logprobs is not None else None
            if delta:
                text, ids = text[seq.sent_text:], ids[seq.sent_tokens:]
                if logprobs is not None:
                    logprobs = logprobs[seq.sent_tokens:]
                seq.sent_text += len(text)
                seq.sent_tokens += len(ids)
            else:
                ids = list(ids)
                logprobs = list(logprobs) if logprobs is not None else None
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=ids, cumulative_logprob=seq.cumulative_logprob,
                logprobs=logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        prompt_logprobs = state.prompt_logprobs
        if delta:  # prompt logprobs go out once, with the first output
            prompt_logprobs = None if state.prompt_logprobs_sent else prompt_logprobs
            state.prompt_logprobs_sent = True
        first = state.seqs[0].request
        # Timestamps for latency metrics (queue time needs the scheduler's first admission).
        metrics = RequestMetrics(arrival_time=first.arrival_time, first_scheduled_time=first.first_scheduled_time,
                                 num_preemptions=sum(s.request.num_preemptions for s in state.seqs))
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids, outputs=completions, finished=finished,
                             prompt_logprobs=prompt_logprobs, num_cached_tokens=max(first.num_cached_tokens, 0),
                             metrics=metrics, lora_request=state.lora_request,
                             num_prompt_embeds=first.num_prompt_tokens if first.prompt_is_embeds else 0)
