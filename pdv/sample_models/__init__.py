"""Small real models shipped with pdv: an MLP, a GPT family, a conv net.

Each factory can be named by its short name (``pdv profile model gpt_tiny``) from any directory;
the names map to ``pdv.sample_models.<module>:<factory>`` without importing torch here.
"""

from __future__ import annotations

__all__ = ["SAMPLES", "sample_spec"]

SAMPLES: dict[str, str] = {
    "mlp": "pdv.sample_models.mlp:mlp",
    "convnet": "pdv.sample_models.convnet:convnet",
    **{
        name: f"pdv.sample_models.gpt:{name}"
        for name in (
            "gpt",
            "gpt_tiny",
            "gpt_small",
            "gpt_medium",
            "gpt_1_3b",
            "gpt_6_7b",
            "gpt_13b",
            "gpt3_175b",
        )
    },
}


def sample_spec(spec: str) -> str | None:
    """The module spec of a sample model named briefly ('gpt_tiny') or by its old repository path
    ('gpt_tiny', as plans written before the models were packaged name it)."""
    if spec in SAMPLES:
        return SAMPLES[spec]
    target, sep, name = spec.rpartition(":")
    if sep and target.replace("\\", "/").lstrip("./").startswith("sample_models/"):
        module = target.rsplit("/", 1)[-1].removesuffix(".py")
        if f"pdv.sample_models.{module}:{name}" in SAMPLES.values():
            return f"pdv.sample_models.{module}:{name}"
    return None
