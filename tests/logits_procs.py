"""Custom logits processors the tests load (by class, or by name as "logits_procs:Class")."""

from __future__ import annotations

from typing import Optional

import torch

from pagedserve.logits_processor import AdapterLogitsProcessor, BatchUpdate, LogitsProcessor, process_dict_updates
from pagedserve.sampling_params import SamplingParams


def scripted_token(script: int, step: int) -> int:
    """The token ScriptProcessor forces at output position `step` of a request with `script`."""
    return (script * 7 + step * 3) % 50 + 10


class ScriptProcessor(LogitsProcessor):
    """Rows whose extra_args carry {"script": s} get exactly scripted_token(s, len(output so
    far)): right only if each row's state is that row's request and its output list is live.
    Checks the batch's invariants as it goes (an error here fails the step)."""

    def __init__(self, config, device: torch.device, is_pin_memory: bool) -> None:
        self.state: dict[int, tuple[int, list[int]]] = {}
        self.batch_size = 0
        self.vocab_size = config.vocab_size

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        s = (sampling_params.extra_args or {}).get("script")
        if s is not None and (not isinstance(s, int) or isinstance(s, bool)):
            raise ValueError(f"extra_args['script'] must be an integer, got {s!r}.")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if batch_update is not None:
            assert not set(batch_update.removed) & {i for i, *_ in batch_update.added}
            self.batch_size = batch_update.batch_size

        def new(params: SamplingParams, prompt: Optional[list[int]], output: list[int]):
            s = (params.extra_args or {}).get("script")
            return None if s is None else (s, output)

        process_dict_updates(self.state, batch_update, new)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        assert logits.shape == (self.batch_size, self.vocab_size) and logits.dtype == torch.float32
        assert all(i < self.batch_size for i in self.state), (self.state, self.batch_size)
        for row, (script, output) in self.state.items():
            logits[row] = float("-inf")
            logits[row, scripted_token(script, len(output))] = 0.0
        return logits


class EchoPrompt(AdapterLogitsProcessor):
    """Per request: {"echo": True} makes the output repeat the prompt (a 3-argument request
    processor, which gets the prompt); {"ban_last": True} bans the token just emitted (a
    2-argument one)."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams):
        args = params.extra_args or {}
        if args.get("echo"):
            def echo(prompt: list[int], output: list[int], row: torch.Tensor) -> torch.Tensor:
                out = torch.full_like(row, float("-inf"))
                out[prompt[len(output) % len(prompt)]] = 0.0
                return out
            return echo
        if args.get("ban_last"):
            def ban(output: list[int], row: torch.Tensor) -> torch.Tensor:
                if output:
                    row[output[-1]] = float("-inf")
                return row
            return ban
        return None


class TopOneRecorder(LogitsProcessor):
    """Argmax-invariant: keeps only each row's largest logit, so sampled rows take the greedy
    token. Records the first row it sees of a request with extra_args {"record": key} in
    `seen[key]` (class-level, for the test to read)."""

    seen: dict[str, torch.Tensor] = {}

    def __init__(self, config, device: torch.device, is_pin_memory: bool) -> None:
        self.keys: dict[int, tuple[str, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        process_dict_updates(self.keys, batch_update,
                             lambda p, _, out: ((p.extra_args or {}).get("record"), out))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (key, output) in self.keys.items():
            if key is not None and not output and key not in self.seen:
                self.seen[key] = logits[row].clone()
        top = logits.max(dim=-1, keepdim=True).values
        return logits.masked_fill(logits < top, float("-inf"))


class NotAProcessor:
    """Lacks apply / update_state / is_argmax_invariant."""

    def __init__(self, *args) -> None:
        pass
