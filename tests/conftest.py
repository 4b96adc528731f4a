"""Shared test helpers: tiny gemmakit configs of every generation and randomly initialized models."""

import pytest
import torch

from gemmakit.config import GLOBAL, LOCAL, Config
from gemmakit.model import Gemma, build


def tiny_config(generation: int) -> Config:
    """A few-layer model of one generation with every feature that generation has switched on."""
    common = dict(name=f"tiny-gemma{generation}", generation=generation, vocab_size=128, d_model=64, n_heads=4,
                  n_kv_heads=2, head_dim=16, intermediate_size=96, max_seq_len=256)
    if generation == 1:
        return Config(**common, n_layers=2, layer_types=(GLOBAL, GLOBAL))
    if generation == 2:
        return Config(**common, n_layers=3, layer_types=(LOCAL, GLOBAL, LOCAL), sliding_window=4,
                      query_pre_attn_scalar=24.0, attn_softcap=50.0, final_softcap=30.0, post_norms=True)
    return Config(**common, n_layers=3, layer_types=(LOCAL, LOCAL, GLOBAL), sliding_window=4,
                  query_pre_attn_scalar=24.0, post_norms=True, qk_norm=True, rope_base_global=1_000_000.0,
                  rope_scale_global=8.0)


def random_model(config: Config, seed: int = 0, std: float = 0.1) -> Gemma:
    """`config` on the CPU in fp32, every weight random, norms included (zero norms would hide bugs)."""
    model = build(config, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "norm" in name else std, generator=g)
    return model


@pytest.fixture
def one_thread():
    """Tiny models compute faster on one thread (more only wait for each other; on a busy machine, a lot).
    Opt in per module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[1, 2, 3], ids=lambda g: f"gemma{g}")
def tiny_model(request) -> Gemma:
    return random_model(tiny_config(request.param))


# -- the real Gemma 3 270M (tests marked `real`): loaded once per session, shared ----------------------

@pytest.fixture(scope="session")
def real_gguf():
    """Path of the real Gemma 3 270M Q4_K_M GGUF (assembled into the gemmakit cache on first use)."""
    from gemmakit.hub import default_gguf

    return default_gguf()


@pytest.fixture(scope="session")
def real_model():
    """(gemmakit model, tokenizer) of the embedded default, fp32, loaded the way the CLI loads it."""
    from gemmakit.hub import load

    return load(None, dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def hf_real_model(real_gguf):
    """transformers' own reading of the same GGUF file, fp32 (the parity reference)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(real_gguf.parent), gguf_file=real_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_real_tokenizer(real_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)
