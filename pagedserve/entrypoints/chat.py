"""`pagedserve chat`: a terminal chat. Each turn renders the whole conversation with the
tokenizer's chat template and streams the reply from the engine as it is generated.
Lines come from stdin, so the loop works on a pipe as well as a terminal; EOF (Ctrl-D) and
Ctrl-C end it cleanly."""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

from pagedserve.sampling_params import RequestOutputKind, SamplingParams

Message = dict[str, str]
_COMMANDS = "/reset clears the conversation, /exit (or Ctrl-D) quits"


class ChatSession:
    """A conversation with one engine: history, prompt rendering, streamed replies."""

    def __init__(self, llm: Any, params: SamplingParams, system: Optional[str] = None) -> None:
        self.engine = llm.llm_engine
        self.tokenizer = llm.get_tokenizer()
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {llm.engine_args.model!r} has no chat template, so `chat` cannot "
                             "format a conversation; use `pagedserve generate` for plain completion.")
        self.params = params.clone()
        self.params.output_kind = RequestOutputKind.DELTA
        self.system = system
        self.history: list[Message] = []

    def reset(self) -> None:
        self.history = []

    def _messages(self, turns: list[Message]) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def render(self, turns: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(self._messages(turns), add_generation_prompt=True, tokenize=False)

    def _fit(self, turns: list[Message]) -> tuple[str, int]:
        """The prompt for `turns`, dropping the oldest exchanges until it leaves room for the
        reply; returns the prompt and how many leading messages it left out."""
        limit = self.engine.config.max_model_len - (self.params.max_tokens or 1)
        dropped = 0
        while True:
            prompt = self.render(turns[dropped:])
            if len(self.tokenizer.encode(prompt)) <= limit:
                return prompt, dropped
            if dropped + 2 >= len(turns):
                raise ValueError(f"the message is too long for this model's context of "
                                 f"{self.engine.config.max_model_len} tokens.")
            dropped += 2  # one user message and its reply

    def reply(self, user_text: str, out: TextIO) -> str:
        """Send one user message; stream the reply to `out`; keep both in the history."""
        turns = self.history + [{"role": "user", "content": user_text}]
        prompt, dropped = self._fit(turns)
        request_id = self.engine.add_request(None, prompt, self.params)
        text = []
        try:
            finished = False
            while not finished:
                for o in self.engine.step():
                    if o.request_id != request_id:
                        continue
                    delta = o.outputs[0].text
                    if delta:
                        out.write(delta)
                        out.flush()
                        text.append(delta)
                    finished = o.finished
        except BaseException:
            self.engine.abort_request(request_id)
            raise
        reply = "".join(text).strip()
        self.history = turns[dropped:] + [{"role": "assistant", "content": reply}]
        return reply


def run_chat(llm: Any, params: SamplingParams, system: Optional[str] = None, stdin: Optional[TextIO] = None,
             stdout: Optional[TextIO] = None) -> int:
    """The read-reply loop; returns the exit code (0 on EOF, /exit or Ctrl-C)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = ChatSession(llm, params, system)
    interactive = stdin.isatty()
    if interactive:
        print(f"pagedserve chat with {llm.engine_args.model} ({_COMMANDS})", file=stdout)
    try:
        while True:
            stdout.write("\n>>> " if interactive else ">>> ")
            stdout.flush()
            line = stdin.readline()
            if not line:  # EOF
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                session.reset()
                continue
            try:
                session.reply(line, stdout)
            except ValueError as e:
                stdout.write(f"[error: {e}]")
            stdout.write("\n")
            stdout.flush()
    except KeyboardInterrupt:
        pass
    stdout.write("\n")
    stdout.flush()
    return 0
