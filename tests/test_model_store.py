"""The model store: Ollama's names (and nothing written outside the store for any name), manifests
created from Modelfiles over files, folders, the bundled model and other stored models, and atomic
writes; copy, delete, list."""
from __future__ import annotations

import json
import os

import pytest

from jaxserve.model_store import InvalidModelName, ModelName, ModelNotFoundError, ModelStore, parse_name
from jaxserve.modelfile import Message, Modelfile, ModelfileError, parse_modelfile


@pytest.fixture
def weights(tmp_path):
    """A folder with a .gguf file (100 bytes), an HF folder (config.json + 10 bytes) and a PEFT adapter."""
    folder = tmp_path / "weights"
    (folder / "hf").mkdir(parents=True)
    (folder / "m.gguf").write_bytes(b"G" * 100)
    (folder / "hf" / "config.json").write_text("{}")
    (folder / "hf" / "model.safetensors").write_bytes(b"S" * 8)
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"A" * 6)
    return folder


@pytest.fixture
def store(tmp_path):
    return ModelStore(str(tmp_path / "store"))


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize("name,parsed,shown", [
    ("llama3", ModelName("registry.ollama.ai", "library", "llama3", "latest"), "llama3:latest"),
    ("Llama3:8B", ModelName("registry.ollama.ai", "library", "llama3", "8b"), "llama3:8b"),
    ("me/my-model.v2:q4_0", ModelName("registry.ollama.ai", "me", "my-model.v2", "q4_0"), "me/my-model.v2:q4_0"),
    ("hf.co/User/Repo-GGUF:Q4_K_M", ModelName("hf.co", "user", "repo-gguf", "q4_k_m"), "hf.co/user/repo-gguf:q4_k_m"),
    ("localhost:5000/ns/m", ModelName("localhost:5000", "ns", "m", "latest"), "localhost:5000/ns/m:latest"),
])
def test_names(name, parsed, shown):
    assert parse_name(name) == parsed and str(parsed) == shown


TRAVERSALS = ["../x", "..", "a/..", "a/../../b", "ns/..:x", "x:../y", "x:..", "/etc/passwd", "/abs", "a\\b",
              "..\\x", "a//b", "", ":tag", "x:", ".hidden", "-dash", "a/b/c/d", "x:a/b", "a b", "a\x00b", "~/x",
              "x:" + "t" * 81]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_bad_names_are_refused_and_nothing_is_written_outside_the_store(name, store, weights, tmp_path):
    before = _tree(tmp_path)
    with pytest.raises(InvalidModelName, match="invalid model name"):
        parse_name(name)
    with pytest.raises(InvalidModelName):
        store.create(name, Modelfile(base=str(weights / "m.gguf")))
    store.create("good", Modelfile(base=str(weights / "m.gguf")))
    with pytest.raises(InvalidModelName):
        store.copy("good", name)
    for op in (store.get, store.delete, store.exists):
        with pytest.raises(InvalidModelName):
            op(name)
    assert _tree(tmp_path) - before == {"store/manifests/registry.ollama.ai/library/good/latest.json"}


def test_a_symlinked_folder_cannot_lead_out_of_the_store(store, weights, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.makedirs(store.manifests)
    os.symlink(outside, os.path.join(store.manifests, "evil.example"))
    with pytest.raises(InvalidModelName, match="would be stored outside"):
        store.create("evil.example/ns/m", Modelfile(base=str(weights / "m.gguf")))
    assert os.listdir(outside) == []


def test_create_from_a_gguf_an_hf_folder_and_relative_paths(store, weights):
    m = store.create("g", parse_modelfile("FROM ./m.gguf\nPARAMETER temperature 0.5\nADAPTER adapter\n"),
                     base_dir=str(weights))
    assert (m.name, m.base, m.source, m.adapters) == ("g:latest", "./m.gguf", str(weights / "m.gguf"),
                                                      (str(weights / "adapter"),))
    assert m.size == 100 + len('{"r": 4}') + 6 and len(m.digest) == 64 and m.id == m.digest[:12]
    assert m.created_at == m.modified_at and m.created_at.endswith("Z")
    h = store.create("ns/h:v1", Modelfile(base=str(weights / "hf")))
    assert (h.name, h.source, h.size) == ("ns/h:v1", str(weights / "hf"), 2 + 8)
    assert store.get("g") == m and store.get("NS/H:V1") == h
    path = os.path.join(store.manifests, "registry.ollama.ai", "library", "g", "latest.json")
    manifest = json.load(open(path))
    assert manifest["schema"] == 1 and manifest["parameters"] == {"temperature": 0.5}


def test_create_from_the_bundled_model(store):
    from jaxserve.models.loader import bundled_model_path

    m = store.create("small", parse_modelfile("FROM smollm2\nSYSTEM hi\n"))
    assert m.source == "smollm2" and m.size == os.path.getsize(bundled_model_path())


def test_a_model_from_a_stored_model_inherits_and_overrides_and_outlives_it(store, weights):
    base = store.create("base", parse_modelfile(
        f'FROM {weights / "m.gguf"}\nPARAMETER temperature 0.5\nPARAMETER stop a\nPARAMETER stop b\n'
        f'PARAMETER top_k 10\nSYSTEM base system\nTEMPLATE {{{{ .Prompt }}}}\nMESSAGE user hi\n'
        f'ADAPTER {weights / "adapter"}\nLICENSE MIT\n'))
    child = store.create("child", parse_modelfile("FROM base\nPARAMETER temperature 0.9\nPARAMETER stop c\n"
                                                   "SYSTEM child system\n"))
    assert child.source == base.source and child.base == "base"
    assert child.parameters == {"temperature": 0.9, "stop": ["c"], "top_k": 10}
    assert (child.system, child.template, child.messages, child.adapters, child.license) == (
        "child system", "{{ .Prompt }}", (Message("user", "hi"),), base.adapters, ("MIT",))
    store.delete("base")
    assert store.get("child") == child  # a snapshot: nothing points at the base
    grandchild = store.create("grandchild", parse_modelfile('FROM child:latest\nSYSTEM ""\nMESSAGE user hey'))
    assert grandchild.system == "" and grandchild.messages == (Message("user", "hey"),)
    assert grandchild.parameters == child.parameters


def test_show_modelfile_recreates_the_same_model(store, weights):
    m = store.create("m", parse_modelfile(
        f'FROM {weights / "m.gguf"}\nPARAMETER stop "<|im_end|>"\nPARAMETER num_ctx 4096\n'
        f'PARAMETER mirostat_tau 5\nSYSTEM """Be\nbrief."""\nMESSAGE user hi\nLICENSE MIT'))
    assert m.show_modelfile() == (
        '# Modelfile generated by "jaxserve show"\n# To build a new Modelfile based on this, replace FROM with:\n'
        f'# FROM m:latest\n\nFROM {weights / "m.gguf"}\nSYSTEM """Be\nbrief."""\nPARAMETER mirostat_tau 5.0\n'
        'PARAMETER num_ctx 4096\nPARAMETER stop <|im_end|>\nMESSAGE user hi\nLICENSE MIT\n')
    again = store.create("again", parse_modelfile(m.show_modelfile()))
    assert again.digest == m.digest
    assert m.parameters_text() == (f"{'mirostat_tau':<30} 5\n{'num_ctx':<30} 4096\n"
                                   f"{'stop':<30} \"<|im_end|>\"")


def test_recreating_keeps_the_creation_time(store, weights):
    first = store.create("m", Modelfile(base=str(weights / "m.gguf"), system="a"))
    second = store.create("m", Modelfile(base=str(weights / "m.gguf"), system="b"))
    assert second.created_at == first.created_at and second.modified_at > first.modified_at
    assert second.digest != first.digest and store.get("m").system == "b"


def test_copy_list_and_delete(store, weights, tmp_path):
    a = store.create("a", Modelfile(base=str(weights / "m.gguf")))
    b = store.copy("a", "ns/b:v2")
    assert (b.name, b.digest, b.source) == ("ns/b:v2", a.digest, a.source)
    assert [m.name for m in store.list()] == ["ns/b:v2", "a:latest"]  # the newest first
    store.delete("ns/b:v2")
    assert [m.name for m in store.list()] == ["a:latest"]
    assert not os.path.exists(os.path.join(store.manifests, "registry.ollama.ai", "ns"))  # emptied folders go
    with pytest.raises(ModelNotFoundError, match=r"^model 'ns/b:v2' not found$"):
        store.delete("ns/b:v2")
    with pytest.raises(ModelNotFoundError, match=r"^model 'nope:latest' not found$"):
        store.get("nope")
    with pytest.raises(ModelNotFoundError):
        store.copy("nope", "x")
    assert not store.exists("nope") and store.exists("a:latest")
    assert ModelStore(str(tmp_path / "empty")).list() == []


def test_the_store_root_comes_from_jaxserve_models(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXSERVE_MODELS", str(tmp_path / "s"))
    assert ModelStore().root == str(tmp_path / "s")
    monkeypatch.delenv("JAXSERVE_MODELS")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ModelStore().root == str(tmp_path / "home" / ".jaxserve" / "models")


def test_a_failed_write_leaves_the_old_manifest_and_no_temporary_file(store, weights, monkeypatch):
    store.create("m", Modelfile(base=str(weights / "m.gguf"), system="old"))
    folder = os.path.join(store.manifests, "registry.ollama.ai", "library", "m")

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        store.create("m", Modelfile(base=str(weights / "m.gguf"), system="new"))
    monkeypatch.undo()
    assert os.listdir(folder) == ["latest.json"] and store.get("m").system == "old"


def test_an_unreadable_manifest_is_skipped_by_list(store, weights):
    store.create("m", Modelfile(base=str(weights / "m.gguf")))
    bad = os.path.join(store.manifests, "registry.ollama.ai", "library", "broken")
    os.makedirs(bad)
    with open(os.path.join(bad, "latest.json"), "w") as f:
        f.write("{not json")
    assert [m.name for m in store.list()] == ["m:latest"]


@pytest.mark.parametrize("text,message", [
    ("SYSTEM hi", "no FROM line: a model needs a base (a stored model, a .gguf file, an HF folder or 'smollm2')"),
    ("# x\nFROM ./missing.gguf", "line 2: FROM ./missing.gguf: no such file or folder (nor a model name)"),
    ("FROM nothere", "line 1: FROM nothere: no model nothere:latest in the store ({root}) and no file or folder of "
                     "that name"),
    ("FROM hf/config.json", "line 1: FROM {weights}/hf/config.json: not a .gguf file, an HF folder (with "
                            "config.json) or a folder of one .gguf file"),
    ("FROM m.gguf\n\nADAPTER hf", "line 3: ADAPTER hf: not a PEFT adapter folder (with adapter_config.json and "
                                  "adapter_model.safetensors)"),
    ("FROM m.gguf\nTEMPLATE \"\"\"\n{{ if .System }}\n\"\"\"",
     "line 2: TEMPLATE does not parse: template line 3, column 1: unexpected EOF"),
])
def test_create_errors_name_the_modelfile_line(text, message, store, weights):
    with pytest.raises(ModelfileError) as e:
        store.create("m", parse_modelfile(text), base_dir=str(weights))
    assert str(e.value) == message.format(root=store.root, weights=weights)
    assert not store.exists("m")
