"""Vicuna v1.1's conversation format as a qtune prompt template, shipped as its own package."""

from qtune.api import PromptTemplate, hookimpl

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class VicunaTemplate(PromptTemplate):
    name = "vicuna"
    description = "Vicuna v1.1 (USER: ... ASSISTANT: ...)"
    fields = ("instruction", "output")
    optional_fields = ("input",)
    response_marker = "ASSISTANT:"

    def render_prompt(self, example):
        user = example["instruction"]
        if example.get("input"):
            user += "\n" + example["input"]
        return f"{SYSTEM} USER: {user} ASSISTANT:"

    def render_completion(self, example):
        return " " + example["output"]

    def stop_strings(self):
        return ["USER:"]


@hookimpl
def register_templates(register):
    register(VicunaTemplate())
