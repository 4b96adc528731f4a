"""Distillation: student configs, the teacher cache (contents, determinism, resume, checks), cached
sampled distillation against online full distillation, and the CLI end to end on tiny models."""

import dataclasses
import json

import pytest
import torch

from gemmakit import cli
from gemmakit.config import GLOBAL, LOCAL, get_config
from gemmakit.model import build
from gemmakit.train import data as D
from gemmakit.train import distill as DI
from gemmakit.train import teacher_cache as TC
from gemmakit.train import trainer as T

V = 300
CFG = get_config("gemma3-270m").replace(name="tiny", vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                        head_dim=16, intermediate_size=64, sliding_window=8, layer_types=(LOCAL, GLOBAL))


def encode(text):
    return [b + 3 for b in text.encode()]


def tiny(seed, cfg=CFG, std=0.3):
    torch.manual_seed(seed)
    m = build(cfg, "cpu")
    m.init_weights(std=std)
    return m


@pytest.fixture
def data_dir(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"to be or not to be, line {i}"}) + "\n" for i in range(12)))
    D.prepare([src], encode, tmp_path / "data", V, val_fraction=0.1)
    return tmp_path / "data"


def test_student_config_presets_and_files(tmp_path):
    assert DI.student_config("gemma3-1b") == get_config("gemma3-1b")
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"base": "gemma3-270m", "n_layers": 12, "d_model": 256, "intermediate_size": 512}))
    c = DI.student_config(str(j))
    assert (c.name, c.n_layers, c.d_model, c.vocab_size) == ("s", 12, 256, 262144)
    assert c.layer_types == (LOCAL,) * 5 + (GLOBAL,) + (LOCAL,) * 5 + (GLOBAL,)
    t = tmp_path / "s2.toml"
    t.write_text('base = "gemma2-2b"\nn_layers = 3\nsliding_window = 64\n')
    c = DI.student_config(str(t))
    assert c.layer_types == (LOCAL, GLOBAL, LOCAL) and c.sliding_window == 64 and c.final_softcap == 30.0
    j.write_text(json.dumps({"base": "gemma3-270m", "n_layer": 2}))
    with pytest.raises(ValueError, match=r"unknown config fields \['n_layer'\]"):
        DI.student_config(str(j))
    j.write_text(json.dumps({"n_layers": 2}))
    with pytest.raises(ValueError, match="'base'"):
        DI.student_config(str(j))
    with pytest.raises(ValueError, match="unknown student"):
        DI.student_config("gemma9-1b")
    with pytest.raises(FileNotFoundError):
        DI.student_config(str(tmp_path / "nope.json"))


def test_vocabulary_mismatch_is_refused(data_dir):
    DI.check_vocab(get_config("gemma3-1b"), 262208)  # 262,144 rows of a 4B's 262,208: a prefix
    with pytest.raises(ValueError, match=r"student vocabulary \(262208\) is larger than the teacher vocabulary "
                                         r"\(262144\)"):
        DI.check_vocab(get_config("gemma3-4b").replace(vocab_size=262208), 262144)
    bigger = tiny(0, CFG.replace(vocab_size=V + 1))
    with pytest.raises(ValueError, match="shared tokenizer"):
        DI.online_full_loss(tiny(1))(bigger, D.PackedData(data_dir, "train", 8, 1).next_batch())


def test_tokenizers_that_differ_are_refused_naming_the_first_id(tmp_path):
    from gguf_files import tiny_vocab

    from gemmakit.tokenizer import Tokenizer

    v = tiny_vocab(320)
    a = Tokenizer.from_gguf_vocab(v)
    more = dataclasses.replace(v, tokens=v.tokens + [f"<extra{i}>" for i in range(8)], scores=v.scores + [0.0] * 8,
                               types=v.types + [3] * 8)  # 8 more rows, like a 4B's image token and padding
    DI.check_pieces(a, Tokenizer.from_gguf_vocab(more), "teacher's", "student's")  # a prefix: fine
    DI.check_pieces(a, None, "teacher's", "data's")  # unknown: nothing to compare
    with pytest.raises(ValueError, match=r"tokenizers differ at id 5 \('<start_of_turn>' vs '<unused5>'\)"):
        DI.check_pieces(a, Tokenizer.from_gguf_vocab(tiny_vocab(320, turn_ids=(7, 8))), "teacher's", "student's")


def truncated_full_loss(student, teacher, batch, T=1.0, alpha=0.0):
    """The reference: the teacher's logits truncated to the student's ids, softmax (renormalized), KD."""
    with torch.no_grad():
        zt = teacher(batch["tokens"], batch.get("positions"))[..., :student.config.vocab_size]
    p = torch.softmax(zt / T, -1)
    logq = torch.log_softmax(student(batch["tokens"], batch.get("positions")) / T, -1)
    valid = batch["targets"] != -100
    kd = -(p * logq).sum(-1)[valid].mean() * T * T
    ce = torch.nn.functional.cross_entropy(student(batch["tokens"])[valid], batch["targets"][valid])
    return (1 - alpha) * kd + alpha * ce


def test_teacher_with_more_rows_distills_over_the_student_ids(tmp_path):
    # Gemma 3 4B+ teachers have 262,208 rows, 1B/270M students 262,144: here 128 and 136.
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"to be or not {i}"}) + "\n" for i in range(8)))
    D.prepare([src], lambda t: [b % 120 + 3 for b in t.encode()], tmp_path / "data", 128, val_fraction=0.0)
    student, teacher = tiny(0, CFG.replace(vocab_size=128)), tiny(1, CFG.replace(vocab_size=136))
    batch = D.PackedData(tmp_path / "data", "train", 8, 2).next_batch()
    for T, alpha in ((1.0, 0.0), (2.0, 0.3)):
        want = truncated_full_loss(student, teacher, batch, T, alpha)
        torch.testing.assert_close(DI.online_full_loss(teacher, T, alpha, chunk=5)(student, batch), want)
    want = truncated_full_loss(student, teacher, batch)
    # sampled: k = the student's vocabulary covers every student id -> the same loss, online ...
    torch.testing.assert_close(DI.online_sampled_loss(teacher, k=128, chunk=5)(student, batch), want)
    # ... and from a cache of the teacher's own ids (all 136): the 8 ids past the student's are dropped
    TC.build_teacher_cache(teacher, tmp_path / "data", tmp_path / "c", k=136, seq_len=8, batch_size=4)
    cache = TC.TeacherCache(tmp_path / "c")
    cache.check(tmp_path / "data", 8, False, 128)
    assert (cache.lookup(batch["windows"])[0] >= 128).any()
    torch.testing.assert_close(DI.cached_sampled_loss(cache, chunk=5)(student, batch), want, rtol=2e-3, atol=1e-4)
    # the gradient flows as for the truncated teacher
    DI.cached_sampled_loss(cache, chunk=5)(student, batch).backward()
    assert student.model.embed_tokens.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"student vocabulary \(137\) is larger than the teacher vocabulary \(136\)"):
        cache.check(tmp_path / "data", 8, False, 137)


def test_old_window_layout_cache_is_refused(data_dir, tmp_path):
    TC.build_teacher_cache(tiny(1), data_dir, tmp_path / "c", k=4, seq_len=8, batch_size=4)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["window_format"] == D.PackedData.WINDOW_FORMAT == 2
    del meta["window_format"]  # as gemmakit wrote it before windows stopped doubling <bos>
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="older sequence layout .*rebuild it"):
        TC.TeacherCache(tmp_path / "c")
    with pytest.raises(ValueError, match="older sequence layout"):
        TC.build_teacher_cache(tiny(1), data_dir, tmp_path / "c", k=4, seq_len=8, batch_size=4)


def test_teacher_cache_max_tokens_bounds_it(data_dir, tmp_path, capsys, monkeypatch):
    d = D.PackedData(data_dir, "train", 8, 2)
    assert d.n_windows > 5
    meta = TC.build_teacher_cache(tiny(1), data_dir, tmp_path / "c", k=4, seq_len=8, max_tokens=5 * 8 + 3)
    assert meta["windows"] == 5 and (tmp_path / "c" / "ids.u32").stat().st_size == 5 * 8 * 4 * 4
    with pytest.raises(ValueError, match="less than one sequence"):
        TC.build_teacher_cache(tiny(1), data_dir, tmp_path / "c2", k=4, seq_len=8, max_tokens=7)
    # the CLI says the size first; distillation from the bounded cache draws only the windows it holds
    from gemmakit import hub

    monkeypatch.setattr(hub, "load", lambda spec, **kw: (tiny(1), None))
    assert cli.main(["teacher-cache", "--teacher", "x.gguf", "--data", str(data_dir), "--out", str(tmp_path / "c3"),
                     "--k", "4", "--seq-len", "8", "--max-tokens", "40"]) == 0
    assert "40 tokens x k 4 x 6 bytes" in capsys.readouterr().err
    seen = []
    real = DI.cached_sampled_loss

    def spy(cache, *a):
        f = real(cache, *a)
        return lambda m, batch: (seen.extend(batch["windows"].tolist()), f(m, batch))[1]

    monkeypatch.setattr(DI, "cached_sampled_loss", spy)
    assert cli.main(["distill", "--model", "gemma3-270m", "--teacher-cache", str(tmp_path / "c3"), "--data",
                     str(data_dir), "--out", str(tmp_path / "run"), "--seq-len", "8", "--batch-size", "2",
                     "--steps", "4", "--warmup", "1"]) == 1  # 262,144 rows > 300: refused before training
    student = tmp_path / "s.json"
    student.write_text(json.dumps({"base": "gemma3-270m", "vocab_size": V, "d_model": 16, "n_layers": 2,
                                   "n_heads": 1, "n_kv_heads": 1, "head_dim": 8, "intermediate_size": 32}))
    assert cli.main(["distill", "--model", str(student), "--teacher-cache", str(tmp_path / "c3"), "--data",
                     str(data_dir), "--out", str(tmp_path / "run"), "--seq-len", "8", "--batch-size", "2",
                     "--steps", "4", "--warmup", "1"]) == 0
    assert len(seen) == 8 and set(seen) <= set(range(5))


def test_teacher_cache_contents_and_resume(data_dir, tmp_path, monkeypatch):
    teacher = tiny(1)
    meta = TC.build_teacher_cache(teacher, data_dir, tmp_path / "c1", k=16, seq_len=8, batch_size=3, chunk=5)
    cache = TC.TeacherCache(tmp_path / "c1")
    d = D.PackedData(data_dir, "train", 8, 2, shuffle=False)
    assert meta["positions"] == d.n_windows * 8 and cache.ids.shape == (d.n_windows * 8, 16)
    batch = d.windows([0, d.n_windows - 1])
    ids, probs = cache.lookup(batch["windows"])
    with torch.no_grad():
        p = torch.softmax(teacher(batch["tokens"]), -1)
    torch.testing.assert_close(probs, p.gather(-1, ids), rtol=2e-3, atol=1e-6)  # fp16 storage
    assert all(len(set(r.tolist())) == 16 for r in ids.reshape(-1, 16))  # no duplicates
    # the sample follows the teacher: the ids drawn carry most of the mass of a confident teacher
    assert probs.sum(-1).mean() > 16 / V * 3

    # an interrupted run, resumed, writes exactly the same cache as an uninterrupted one
    calls = {"n": 0}
    real = TC.sample_teacher

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(TC, "sample_teacher", dying)
    with pytest.raises(KeyboardInterrupt):
        TC.build_teacher_cache(teacher, data_dir, tmp_path / "c2", k=16, seq_len=8, batch_size=3, chunk=5)
    done = json.loads((tmp_path / "c2" / "progress.json").read_text())["windows_done"]
    assert 0 < done < d.n_windows
    with pytest.raises(ValueError, match="incomplete"):
        TC.TeacherCache(tmp_path / "c2")
    monkeypatch.setattr(TC, "sample_teacher", real)
    TC.build_teacher_cache(teacher, data_dir, tmp_path / "c2", k=16, seq_len=8, batch_size=2, chunk=5)
    for f in ("ids.u32", "probs.f16"):
        assert (tmp_path / "c1" / f).read_bytes() == (tmp_path / "c2" / f).read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        TC.build_teacher_cache(teacher, data_dir, tmp_path / "c2", k=8, seq_len=8)
    with pytest.raises(ValueError, match="seq_len 8"):
        cache.check(data_dir, 16, False, V)
    with pytest.raises(ValueError, match="student vocabulary"):
        cache.check(data_dir, 8, False, V + 1)
    cache.check(data_dir, 8, False, V - 1)  # a student vocabulary that is a prefix of the teacher's


def test_cached_sampled_with_full_support_trains_like_online_full(data_dir, tmp_path):
    # k = vocabulary: the sample is the whole support, so the Gemma 3 loss is the Gemma 2 loss and the
    # two runs must agree step by step (up to the fp16 storage of the probabilities).
    teacher = tiny(1)
    TC.build_teacher_cache(teacher, data_dir, tmp_path / "c", k=V, seq_len=8, batch_size=4)
    cache = TC.TeacherCache(tmp_path / "c")
    cfg = T.TrainConfig(steps=5, batch_size=2, seq_len=8, lr=1e-2, warmup=1, ckpt_every=100, chunk=6)
    runs = {}
    for name, fn in (("full", DI.online_full_loss(teacher, chunk=6)), ("sampled", DI.cached_sampled_loss(cache, chunk=6))):
        runs[name] = [r["loss"] for r in T.train(tiny(0, std=0.02), D.PackedData(data_dir, "train", 8, 2), cfg,
                                                  tmp_path / name, loss_fn=fn)["log"]]
    assert runs["sampled"] == pytest.approx(runs["full"], rel=1e-3)
    assert runs["full"][-1] < runs["full"][0]
    # with k = 4 it is a different (sampled) objective: close to, but not the same as, the full loss
    TC.build_teacher_cache(teacher, data_dir, tmp_path / "c4", k=4, seq_len=8, batch_size=4)
    small = T.train(tiny(0, std=0.02), D.PackedData(data_dir, "train", 8, 2), cfg, tmp_path / "k4",
                    loss_fn=DI.cached_sampled_loss(TC.TeacherCache(tmp_path / "c4"), chunk=6))["log"]
    assert [r["loss"] for r in small] != pytest.approx(runs["full"], rel=1e-3)


def test_online_sampled_matches_cache_objective(data_dir):
    teacher, student = tiny(1), tiny(0)
    batch = D.PackedData(data_dir, "train", 8, 2).next_batch()
    full = DI.online_full_loss(teacher)(student, batch)
    sampled = DI.online_sampled_loss(teacher, k=V)(student, batch)
    torch.testing.assert_close(sampled, full, rtol=1e-5, atol=1e-5)


def test_cli_distill_from_cache_and_errors(data_dir, tmp_path, capsys):
    TC.build_teacher_cache(tiny(1), data_dir, tmp_path / "cache", k=8, seq_len=8, batch_size=4)
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"base": "gemma3-270m", "vocab_size": V, "d_model": 16, "n_layers": 2,
                                   "n_heads": 1, "n_kv_heads": 1, "head_dim": 8, "intermediate_size": 32,
                                   "sliding_window": 4}))
    common = ["--data", str(data_dir), "--seq-len", "8", "--batch-size", "2", "--steps", "3", "--warmup", "1"]
    rc = cli.main(["distill", "--model", str(student), "--teacher-cache", str(tmp_path / "cache"),
                   "--out", str(tmp_path / "run"), *common])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 3 and out["val_loss"] > 0
    assert (tmp_path / "run" / "model" / "config.json").exists()
    rc = cli.main(["train", "--model", str(student), "--out", str(tmp_path / "ce"), *common])
    assert rc == 0
    student.write_text(json.dumps({"base": "gemma3-270m", "d_model": 16}))  # vocabulary 262144 != 300
    rc = cli.main(["distill", "--model", str(student), "--teacher-cache", str(tmp_path / "cache"),
                   "--out", str(tmp_path / "bad"), *common])
    err = capsys.readouterr().err
    assert rc == 1 and "student vocabulary (262144) is larger than the teacher vocabulary (300)" in err
    rc = cli.main(["distill", "--model", str(student), "--teacher-cache", str(tmp_path / "nocache"),
                   "--out", str(tmp_path / "bad"), *common])
    assert rc == 1 and "not a teacher cache" in capsys.readouterr().err
