"""The built-in demo model: it loads by default, speaks mostly real words (a random model with
the same tokenizer does not), `verify` agrees with transformers on it and on every supported
architecture and fails on a broken weight file, and `pagedserve chat` answers and exits cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.demo import demo_model_path
from pagedserve.demo.corpus import real_word_fraction, word_vocabulary
from pagedserve.entrypoints import cli
from pagedserve.entrypoints.verify import main_verify
from pagedserve.model.random_model import build_random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The", "A list is", "The if statement", "In Python, a function", "Return the number of"]
SMALL_KV = 32 << 20


@pytest.fixture(scope="module")
def demo_llm() -> LLM:
    return LLM()  # no model argument: the demo model


@pytest.fixture(scope="module")
def vocab() -> set[str]:
    return word_vocabulary()


def _greedy_text(llm: LLM, max_tokens: int = 32) -> str:
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return "\n".join(o.outputs[0].text for o in outs)


def test_llm_without_model_loads_the_demo_model(demo_llm, caplog):
    assert demo_llm.engine_args.model == demo_model_path()
    assert demo_llm.llm_engine.config.hf_config.architectures == ["LlamaForCausalLM"]
    files = set(os.listdir(demo_model_path()))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert os.path.getsize(os.path.join(demo_model_path(), "model.safetensors")) < 30 * 2**20


def test_demo_model_speaks_real_words_and_a_random_model_does_not(demo_llm, vocab, tmp_path):
    text = _greedy_text(demo_llm)
    words = text.split()
    assert len(words) >= 5 * len(PROMPTS) // 2, text
    assert real_word_fraction(text, vocab) > 0.8, text

    random_dir = build_random_model(str(tmp_path / "random"), tokenizer_dir=demo_model_path())
    random_text = _greedy_text(LLM(model=random_dir, kv_cache_memory_bytes=SMALL_KV))
    assert real_word_fraction(random_text, vocab) <= 0.8, random_text


def test_demo_model_answers_in_the_chat_format_and_stops(demo_llm):
    tok = demo_llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the assert statement?"}],
                                     add_generation_prompt=True, tokenize=False)
    out = demo_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=128), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop", out.text  # it ends its turn by itself
    assert len(out.text.split()) >= 3 and "<|im_start|>" not in out.text


@pytest.mark.parametrize("name", ["demo", "llama", "mistral", "qwen2", "qwen3"])
def test_verify_passes(name, model_dirs, capsys):
    path = demo_model_path() if name == "demo" else model_dirs[name]
    rc = cli.main(["verify", path, "--max-tokens", "12"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS: greedy tokens agree" in out


def test_verify_fails_on_a_truncated_weight_file(tmp_path, capsys):
    broken = str(tmp_path / "broken")
    shutil.copytree(demo_model_path(), broken)
    weights = os.path.join(broken, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    rc = main_verify(broken)
    out = capsys.readouterr().out
    assert rc != 0
    assert "FAIL" in out and "could not load" in out and "model.safetensors" in out


def test_verify_fails_when_pagedserve_computes_something_else(llama_dir, monkeypatch, capsys):
    # Perturb one weight on pagedserve's side only: verify must notice the disagreement.
    from pagedserve.model import loader

    real = loader.iterate_safetensors

    def perturbed(*args, **kwargs):
        for name, t in real(*args, **kwargs):
            yield name, (t * 1.5 if name.endswith("layers.0.mlp.down_proj.weight") else t)

    monkeypatch.setattr(loader, "iterate_safetensors", perturbed)
    rc = main_verify(llama_dir, max_tokens=12)
    out = capsys.readouterr().out
    assert rc != 0, out
    assert "FAIL: greedy tokens differ" in out and "first divergence at generated token" in out


def test_generate_cli_defaults_to_the_demo_model(capsys, caplog):
    caplog.set_level("INFO", logger="pagedserve")
    rc = cli.main(["generate", "--prompt", "The for statement", "--max-tokens", "8",
                   "--kv-cache-memory-bytes", str(SMALL_KV)])
    assert rc == 0
    assert capsys.readouterr().out.startswith("The for statement")
    assert any("built-in demo model" in r.getMessage() for r in caplog.records)


def _chat_process() -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "pagedserve.entrypoints.cli", "chat", "--max-tokens", "48",
                             "--kv-cache-memory-bytes", str(SMALL_KV)], cwd=REPO, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_chat_answers_and_exits_cleanly_on_eof():
    proc = _chat_process()
    out, err = proc.communicate("What is the assert statement?\n", timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "built-in demo model" in err
    reply = out.split(">>> ")[1]  # what came after the first prompt marker
    assert len(reply.split()) >= 3, out


def test_chat_exits_cleanly_on_ctrl_c():
    proc = _chat_process()
    try:
        assert proc.stdout.read(4) == ">>> "  # ready and waiting for a line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_the_demo_draft_drafts_for_the_demo_model(demo_llm):
    """The shipped draft model (distilled from the demo model, its tokenizer): greedy text is
    the demo model's own, and a good share of its drafts stand (a random draft's almost never
    do)."""
    from pagedserve.demo import demo_draft_path

    spec = LLM(speculative_config={"model": demo_draft_path(), "num_speculative_tokens": 2})
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in demo_llm.generate(PROMPTS, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in spec.generate(PROMPTS, params, use_tqdm=False)] == want
    sched = spec.llm_engine.scheduler
    assert sched.num_accepted_tokens > 0.25 * sched.num_draft_tokens


def test_distillation_loss():
    """The draft's training loss: cross entropy, mixed with the KL divergence from a teacher's
    distribution (zero when the teacher is the model itself)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pagedserve.demo.train import _loss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model, other = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ce = _loss(model, x)
        assert torch.allclose(_loss(model, x, teacher=model, distill=0.25), 0.75 * ce)
        assert _loss(model, x, teacher=other, distill=0.25) > 0.75 * ce + 1e-4
