"""A type that ComfyUI's link validation accepts on any input, combos included.

Validation compares an output's type with an input's type with `!=` (comfy_execution/validation.py:
`validate_node_input`, which keeps "the pre-union behaviour of __ne__ overrides"). A LoraLoader's
`lora_name` is a combo (a list of names), so a plain "*" string or "STRING" output is refused; a `str`
whose `!=` always answers False passes, and the front end treats "*" as connectable to anything.
"""


class AnyType(str):
    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


ANY = AnyType("*")
