"""What a new user meets first: typed errors for wrong arguments (before any model loads), the
CLI's argument checks, `functional-llm chat`, a stall reported instead of a hang, and a quiet
exit."""
import io
import subprocess
import sys

import attrs
import pytest
import torch

from functional_llm import LLM, SamplingParams
from functional_llm.cli import chat_session, main
from functional_llm.core.trace import state_digest
from functional_llm.errors import EngineStalled, InvalidConfig, InvalidModel
from functional_llm.runtime.engine import Engine
from tests.tiny_models import add_char_tokenizer, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return add_char_tokenizer(make_tiny_model("qwen3", tmp_path_factory.mktemp("chat"), seed=2))


def test_unusable_device_and_model_limits_are_typed_errors(tiny):
    cases = [({"device": "tpu"}, InvalidConfig, "device"),
             ({"device": "cuda:x"}, InvalidConfig, "device"),
             ({"max_model_len": 513}, InvalidConfig, "max_model_len"),   # the model's limit: 512
             ({"model": str(tiny / "config.json")}, InvalidModel, "model")]
    if not torch.cuda.is_available():
        cases.append(({"device": "cuda"}, InvalidConfig, "device"))
    for kw, err, param in cases:
        with pytest.raises(err) as e:
            LLM(**{"model": str(tiny), **kw})
        assert e.value.parameter == param, kw
        assert "model" not in kw or "is a file" in str(e.value)
    assert LLM(str(tiny), max_model_len=512).engine.sched.max_model_len == 512


@pytest.mark.parametrize("argv,message", [
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "hi", "--max-tokens", "many"], "--max-tokens"),
    (["generate", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "hi", "--seed", "-3"], "--seed"),
    (["generate", "hi", "--device", "tpu"], "--device"),
    (["generate", "hi", "--dtype", "int8"], "--dtype"),
    (["generate", "hi", "--kv-cache-dtype", "int4"], "--kv-cache-dtype"),
    (["generate", "hi", "--model", "/nonexistent/folder"], "no such folder"),
    (["chat", "--model", "README.md"], "is a file"),
    (["chat", "--temperature", "hot"], "--temperature")])
def test_cli_checks_arguments_before_loading_a_model(argv, message, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(LLM, "__init__", no_model)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_kv_cache_dtype_reaches_the_llm(tiny, capsys, monkeypatch):
    made, init = [], LLM.__init__
    monkeypatch.setattr(LLM, "__init__", lambda self, **kw: made.append(self) or init(self, **kw))
    assert main(["generate", "Hi", "--model", str(tiny), "--kv-cache-dtype", "fp8", "--max-tokens", "3"]) == 0
    assert made[0].engine.runner.kv.dtype == torch.uint8      # the fp8 pool: e4m3 values + scales
    assert capsys.readouterr().out.strip()


def test_chat_session_streams_and_keeps_the_history(tiny):
    llm = LLM(str(tiny), block_size=4)
    params = SamplingParams(temperature=0, max_tokens=6)
    lines, written = iter(["Hi", "", "and again", "/exit", "never read"]), []
    messages = chat_session(llm, params, lambda: next(lines), written.append, system="Be brief.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    # each answer is what chat() gives for the whole conversation before it
    for turn in (2, 4):
        want = llm.chat(messages[:turn], params, use_tqdm=False)[0].text
        assert messages[turn]["content"] == want
    assert len(written) > 4          # streamed: several pieces per answer
    assert "".join(written) == messages[2]["content"] + "\n" + messages[4]["content"] + "\n"
    assert llm.counters["blocks_in_use"] == 0


@pytest.mark.parametrize("stdin,interrupt", [("Hi\n", False), ("Hi\n/exit\n", False), ("", True)])
def test_chat_command_leaves_cleanly(tiny, stdin, interrupt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    if interrupt:   # Ctrl-C at the prompt
        monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["chat", "--model", str(tiny), "--max-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and (interrupt or out.strip())


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_request_that_can_never_start_raises_instead_of_hanging(tiny, pipeline):
    """No seat can ever be free (a scheduler configuration the shell refuses, given to the
    engine directly): the step raises EngineStalled naming the waiting requests and leaves the
    state as it was; generate raises it too and leaves nothing behind."""
    llm = LLM(str(tiny), block_size=4)
    engine = Engine(llm.engine.runner, attrs.evolve(llm.engine.sched, max_num_seqs=0), pipeline=pipeline)
    llm.engine = engine
    with pytest.raises(EngineStalled) as e:
        llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(e.value.value) == 2 and "max_num_seqs=0" in str(e.value)
    assert not engine.has_unfinished() and engine.state.blocks_in_use == 0
    rid = llm.add_request([5, 6, 7], SamplingParams(max_tokens=3))
    before = state_digest(engine.state)
    with pytest.raises(EngineStalled) as e:
        engine.step()
    assert e.value.value == (rid,) and state_digest(engine.state) == before   # unchanged
    llm.abort(rid)
    assert not llm.has_unfinished_requests()


def test_no_leak_report_at_exit_when_triton_was_imported():
    """LLM start-up freezes the collector's objects (quiet_collector); frozen triton objects
    (torch._dynamo imports triton, e.g. while the embedded model is converted) made nanobind
    print 'leaked' lines at exit unless the objects are unfrozen first."""
    pytest.importorskip("triton")
    code = ("import torch._dynamo\nfrom functional_llm.llm import quiet_collector\n"
            "quiet_collector()\nquiet_collector()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "leaked" not in done.stderr, done.stderr[-500:]
