"""Hugging Face export/import: a tiny GQA model of ours (tied and untied), trained two steps,
must give HF's own LlamaForCausalLM the same logits, greedy generations and token ids."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _corpus import ROOT, tiny_overrides, torchrun, train_rows  # noqa: E402
from kis_megatron.config import ModelConfig, load_config, save_config  # noqa: E402
from kis_megatron.data.tokenizer import Tokenizer  # noqa: E402
from kis_megatron.errors import KisError  # noqa: E402
from kis_megatron.interop.hf import InteropError, export_hf, import_hf, load_init  # noqa: E402
from kis_megatron.model.llama import Transformer  # noqa: E402
from kis_megatron.training.trainer import Trainer  # noqa: E402

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "Panmilo Renfeson came into the world in 1950",
    "  two  leading spaces, é ü 中文 and 12345 digits",
    "Tabs\tand\nnew lines; </s> is only text here.",
    "x",
]


def _train(world_corpus, run_dir, tied: bool) -> Trainer:
    # init_std 0.1 makes logits spread enough that greedy argmax is never a near-tie.
    cfg = load_config(None, tiny_overrides(world_corpus, run_dir, **{
        "train.steps": 2, "model.tie_embeddings": tied, "model.init_std": 0.1}))
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.model.eval()
    return trainer


@pytest.fixture(scope="module")
def exports(world_corpus, tmp_path_factory):
    """Trained-and-exported tiny models, built on first use and shared by the module."""
    made = {}

    def get(tied: bool) -> dict:
        if tied not in made:
            d = tmp_path_factory.mktemp("tied" if tied else "untied")
            trainer = _train(world_corpus, d / "run", tied=tied)
            export_hf(d / "run", d / "hf")
            hf = transformers.AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval()
            made[tied] = {"dir": d, "hf_dir": d / "hf", "model": trainer.model, "hf": hf, "tied": tied,
                          "corpus": world_corpus}
        return made[tied]

    return get


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def exported(request, exports):
    return exports(request.param)


@pytest.fixture
def untied(exports):
    """For checks that do not depend on tying: run once, on the untied model."""
    return exports(False)


def _tokens(seed=0, batch=2, length=24, vocab=400):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _assert_logits_close(got, ref):
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err


@pytest.mark.slow
@torch.no_grad()
def test_hf_logits_equal_ours(exported):
    tokens = _tokens()
    ours = exported["model"](tokens)
    theirs = exported["hf"](input_ids=tokens).logits
    assert theirs.shape == ours.shape
    _assert_logits_close(theirs, ours)
    cfg = json.loads((exported["hf_dir"] / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is exported["tied"] and cfg["num_key_value_heads"] == 2
    from safetensors import safe_open

    with safe_open(str(exported["hf_dir"] / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not exported["tied"]


@pytest.mark.slow
@torch.no_grad()
def test_import_gives_the_same_model(exported):
    fields, state = import_hf(exported["hf_dir"])
    src = exported["model"].cfg
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "tie_embeddings"):
        assert fields[key] == getattr(src, key), key
    assert fields["n_kv_heads"] == 2 and fields["ffn_dim"] == exported["model"].dims.ffn_dim
    back = Transformer(ModelConfig(**fields, kernels=False))
    back.load_state_dict(state, strict=True)
    back.eval()
    tokens = _tokens(seed=1)
    assert torch.equal(back(tokens), exported["model"](tokens))  # same fp32 weights, bit for bit
    if exported["tied"]:
        assert back.output.weight is back.tok_embeddings.weight


@pytest.mark.slow
@torch.no_grad()
def test_greedy_generation_identical(exported):
    tok = Tokenizer(exported["corpus"]["tokenizer"])
    prompt = tok.encode("Nolkala Pipilley is an expert in")
    eos = tok.eod_id
    ids = list(prompt)
    for _ in range(20):  # plain greedy loop over our model, no cache, stopping at EOD like HF
        nxt = int(exported["model"](torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    out = exported["hf"].generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  do_sample=False, max_new_tokens=20)
    assert out[0].tolist() == ids
    assert len(ids) > len(prompt) + 1


@pytest.mark.slow
def test_autotokenizer_ids_equal_ours(untied, world_corpus):
    hf_tok = transformers.AutoTokenizer.from_pretrained(untied["hf_dir"])
    ours = Tokenizer(world_corpus["tokenizer"])
    lines = [json.loads(x)["text"] for x in
             (world_corpus["dir"] / "world/domain/train.jsonl").read_text().splitlines()[:200]]
    for text in SENTENCES + lines:
        ids = hf_tok(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert hf_tok.decode(ids) == ours.decode(ids)
    assert (hf_tok.unk_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == \
        (ours.unk_id, ours.bos_id, ours.eod_id, ours.pad_id) == (0, 1, 2, 3)
    assert (untied["hf_dir"] / "tokenizer.model").read_bytes() == \
        open(world_corpus["tokenizer"], "rb").read()


def test_unigram_tokenizer_converts_exactly(world_corpus, tmp_path):
    from kis_megatron.data.tokenizer import train_tokenizer
    from kis_megatron.interop.hf_tokenizer import build_tokenizer_json

    src = world_corpus["dir"] / "world/general/train.jsonl"
    text = tmp_path / "t.txt"
    lines = [json.loads(x)["text"] for x in src.read_text().splitlines()]
    text.write_text("\n".join(lines) + "\n")
    model = train_tokenizer(text, tmp_path / "uni", vocab_size=400, model_type="unigram")
    fast, ours = build_tokenizer_json(model), Tokenizer(model)
    # Literal "</s>" in text is the one documented unigram difference (see hf_tokenizer).
    for t in [s.replace("</s>", "<s/>") for s in SENTENCES] + lines[:200]:
        assert fast.encode(t, add_special_tokens=False).ids == ours.encode(t), t


@pytest.mark.slow
@torch.no_grad()
def test_sharded_export_loads(untied):
    out = untied["dir"] / "hf_sharded"
    export_hf(untied["dir"] / "run", out, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert all((out / f).stat().st_size <= 40_000 + 20_000 for f in files)  # header slack
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _tokens(seed=2)
    _assert_logits_close(hf(input_ids=tokens).logits, untied["model"](tokens))
    _, a = import_hf(out)
    _, b = import_hf(untied["hf_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("changes, words", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "llama3"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 16}, "head_dim"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_unsupported_hf_configs_are_refused(untied, tmp_path, changes, words):
    bad = _edited_copy(untied["hf_dir"], tmp_path / "bad", **changes)
    with pytest.raises(InteropError, match=words):
        import_hf(bad)


@pytest.mark.slow
def test_load_init_names_a_mismatch_and_export_refuses_a_used_folder(untied, tmp_path):
    other = Transformer(ModelConfig(vocab_size=400, dim=32, n_layers=3, n_heads=4, n_kv_heads=2))
    with pytest.raises(InteropError, match="n_layers"):
        load_init(other, f"hf:{untied['hf_dir']}")
    with pytest.raises(InteropError, match="hf:DIR"):
        load_init(other, str(untied["hf_dir"]))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    with pytest.raises(KisError, match="used already exists.*--force"):
        export_hf(untied["dir"] / "run", tmp_path / "used")
    assert os.listdir(tmp_path / "used") == ["keep.txt"]
    # a shard missing from a sharded folder is named
    broken = _edited_copy(untied["hf_dir"], tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    with pytest.raises(InteropError, match="model.safetensors"):
        import_hf(broken)


@pytest.mark.slow
def test_export_works_from_any_directory(untied, world_corpus, tmp_path, monkeypatch):
    """A run's relative paths (here data.tokenizer) are taken from where the run was launched
    (run.json's launch_dir), not from where the export is started."""
    run = tmp_path / "run"
    shutil.copytree(untied["dir"] / "run", run)
    launch = world_corpus["dir"]
    cfg = load_config(run / "config.yaml")
    cfg.data.tokenizer = os.path.relpath(world_corpus["tokenizer"], launch)
    save_config(cfg, run / "config.yaml")
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "launch_dir": str(launch)}))
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists(cfg.data.tokenizer)  # not from here
    export_hf("run", "hf")
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.slow
@torch.no_grad()
def test_kis_train_starts_from_imported_weights(exported, tmp_path):
    yaml_path = tmp_path / "from_hf.yaml"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/import_hf.py"), str(exported["hf_dir"]),
                           "--out", str(yaml_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    # The config stands on its own: a data.seq_len the model supports (max_seq_len is 64 here).
    assert load_config(yaml_path).data.seq_len == 64
    corpus = exported["corpus"]
    overrides = [o for o in tiny_overrides(corpus, tmp_path / "run2", **{"train.steps": 1})
                 if not o.startswith("model.")]
    trainer = Trainer(load_config(yaml_path, overrides))
    assert trainer.cfg.model.init_from == f"hf:{exported['hf_dir'].resolve()}"
    trainer.model.eval()
    tokens = _tokens(seed=3)
    assert torch.equal(trainer.model(tokens), exported["model"](tokens))


def test_clis_report_user_errors(tmp_path):
    for tool, args in (("export_hf", [str(tmp_path), "--out", str(tmp_path / "o")]),
                       ("import_hf", [str(tmp_path), "--out", str(tmp_path / "c.yaml")])):
        proc = subprocess.run([sys.executable, str(ROOT / f"tools/{tool}.py"), *args],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tp2_pp2_checkpoint_round_trip(world_corpus, tmp_path):
    """A tp=2 x pp=2 run (4 gloo processes) exports to HF with the logits of the same
    checkpoint loaded into one process, and an HF import starts a tp=2 x pp=2 run from exactly
    those weights."""
    run = tmp_path / "tp2_pp2"
    layout = {"parallel.tp": 2, "parallel.pp": 2, "model.tie_embeddings": False}
    over = tiny_overrides(world_corpus, run, **{"train.steps": 2, "model.init_std": 0.1, **layout})
    proc = torchrun(4, "-m", "kis_megatron.train", *over)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export_hf(run, tmp_path / "hf")
    cfg = load_config(run / "config.yaml")
    ours = Transformer(cfg.model)
    from kis_megatron.training.checkpoint import CheckpointManager

    mgr = CheckpointManager(run / "checkpoints")
    mgr.load(mgr.latest(), ours, None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = _tokens()
    with torch.no_grad():
        _assert_logits_close(hf(input_ids=tokens).logits, ours.eval()(tokens))
    # back in at tp=2 x pp=2: the first step's loss equals that of one process from the same weights
    losses = {}
    for nproc in (1, 4):
        d = tmp_path / f"from_hf_{nproc}"
        args = tiny_overrides(world_corpus, d, **{"train.steps": 1, "model.init_from": f"hf:{tmp_path / 'hf'}",
                                                   **(layout if nproc == 4 else {"model.tie_embeddings": False})})
        proc = torchrun(nproc, "-m", "kis_megatron.train", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[nproc] = train_rows(d)[1]["loss"]
    assert abs(losses[1] - losses[4]) <= 1e-5 * losses[1]
