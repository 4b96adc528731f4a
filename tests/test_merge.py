"""Model merging (gemmakit.train.merge): each method against its formula on tiny checkpoints, mismatches
named, the output written whole with the first input's tokenizer."""

import json

import pytest
import torch

from conftest import random_model, tiny_config
from gguf_files import tiny_vocab
from gemmakit import cli, weights
from gemmakit.tokenizer import Tokenizer
from gemmakit.train.merge import merge, slerp

CFG = tiny_config(3).replace(vocab_size=300)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Three tiny checkpoints of one architecture (the first with a tokenizer) and their state dicts."""
    d = tmp_path_factory.mktemp("ckpts")
    tok = Tokenizer.from_gguf_vocab(tiny_vocab(300))
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        m = random_model(CFG, seed=i)
        weights.save(m, d / name, tokenizer=tok if name == "a" else None)
        out[name] = (d / name, m.state_dict())
    return out


def _merged(path):
    return weights.load_state_dict(path)


def test_average_is_the_mean_tensor_for_tensor(ckpts, tmp_path):
    (a, sa), (b, sb) = ckpts["a"], ckpts["b"]
    got = _merged(merge([a, b], tmp_path / "avg"))
    assert got.keys() == sa.keys()
    for k in sa:
        torch.testing.assert_close(got[k], (sa[k] + sb[k]) / 2, rtol=0, atol=1e-7)
    got = _merged(merge([a, b], tmp_path / "w", weights=[3, 1]))
    for k in sa:
        torch.testing.assert_close(got[k], 0.75 * sa[k] + 0.25 * sb[k], rtol=0, atol=1e-6)


def test_task_arithmetic_adds_task_vectors_to_the_base(ckpts, tmp_path):
    (base, s0), (a, sa), (b, sb) = ckpts["base"], ckpts["a"], ckpts["b"]
    got = _merged(merge([a, b], tmp_path / "ta", method="task-arithmetic", weights=[0.5, 0.3], base=base))
    for k in s0:
        torch.testing.assert_close(got[k], s0[k] + 0.5 * (sa[k] - s0[k]) + 0.3 * (sb[k] - s0[k]), rtol=0, atol=1e-6)


def test_slerp_at_0_and_1_returns_the_inputs(ckpts, tmp_path):
    (base, _), (a, sa), (b, sb) = ckpts["base"], ckpts["a"], ckpts["b"]
    for w, want in (([1, 0], sa), ([0, 1], sb)):
        got = _merged(merge([a, b], tmp_path / f"s{w}", method="slerp", weights=w))  # the weights themselves
        assert all(torch.equal(got[k], want[k]) for k in want)
        got = _merged(merge([a, b], tmp_path / f"t{w}", method="slerp", weights=w, base=base))  # task vectors
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)  # base + (x - base): rounding only


def test_slerp_follows_the_arc():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])  # 90 degrees apart, norms 1 and 2
    torch.testing.assert_close(slerp(a, b, 0.5), torch.tensor([0.5 ** 0.5, 2 * 0.5 ** 0.5]))
    torch.testing.assert_close(slerp(a, 3 * a, 0.5), 2 * a)  # parallel: linear
    # three orthogonal unit vectors, folded in one at a time (t = 1/2, then 1/3): stays on the unit sphere
    from gemmakit.train.merge import merge_tensors

    e = torch.eye(3)
    mid = merge_tensors("slerp", [e[0], e[1], e[2]], [1, 1, 1], None)
    h = 0.5 ** 0.5
    torch.testing.assert_close(mid, torch.tensor([0.75 ** 0.5 * h, 0.75 ** 0.5 * h, 0.5]))  # sin 60, sin 30
    assert abs(float(mid.norm()) - 1) < 1e-6  # unlike the mean (norm 0.577)


def test_interpolation_toward_the_base(ckpts, tmp_path):
    (base, s0), (a, sa) = ckpts["base"], ckpts["a"]
    got = _merged(merge([a], tmp_path / "i0", method="interpolate", weights=[0.0], base=base))
    assert all(torch.equal(got[k], s0[k]) for k in s0)
    got = _merged(merge([a], tmp_path / "i25", method="interpolate", weights=[0.25], base=base))
    for k in s0:
        torch.testing.assert_close(got[k], 0.75 * s0[k] + 0.25 * sa[k], rtol=0, atol=1e-6)


def test_mismatches_are_named_and_nothing_is_written(ckpts, tmp_path):
    a = ckpts["a"][0]
    weights.save(random_model(CFG.replace(intermediate_size=48)), tmp_path / "wide")
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight: shape \[64, 48\] in "):
        merge([a, tmp_path / "wide"], tmp_path / "out")
    weights.save(random_model(CFG.replace(n_layers=2, layer_types=CFG.layer_types[:2])), tmp_path / "short")
    with pytest.raises(ValueError, match=r"config n_layers: 2 in .*short, 3 in .*; .*tensor model\.layers\.2\.mlp\."
                                         r"down_proj\.weight: missing in .*short"):
        merge([a, tmp_path / "short"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    with pytest.raises(ValueError, match="needs --base"):
        merge([a], tmp_path / "out", method="interpolate", weights=[0.5])
    with pytest.raises(ValueError, match="--weights has 1 values for 2 models"):
        merge([a, a], tmp_path / "out", weights=[1])
    with pytest.raises(FileExistsError, match="is one of the models"):
        merge([a, ckpts["b"][0]], a)


def test_cli_merge_writes_a_loadable_model_with_the_first_inputs_tokenizer(ckpts, tmp_path, capsys):
    a, b = ckpts["a"][0], ckpts["b"][0]
    out = tmp_path / "m"
    assert cli.main(["merge", str(a), str(b), "--method", "slerp", "--weights", "1", "1", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    assert (out / "tokenizer.model").read_bytes() == (a / "tokenizer.model").read_bytes()
    assert json.loads((out / "merge.json").read_text())["method"] == "slerp"
    weights.load(out)  # strict load: every tensor present with its shape
    assert cli.main(["merge", str(a), "--method", "average", "--out", str(out)]) == 1
    assert "gemmakit: error: --method average needs at least two models" in capsys.readouterr().err
