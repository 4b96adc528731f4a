"""gemmakit: Gemma 1/2/3 in PyTorch. `generate_text` (text in, text out), `stream_text` and `generate` (ids)
come from gemmakit.engine; they load on first use, so `import gemmakit` (and the CLI) stays fast."""

__all__ = ["generate", "generate_text", "stream_text"]


def __getattr__(name: str):
    if name in __all__:
        from gemmakit import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'gemmakit' has no attribute {name!r}")
