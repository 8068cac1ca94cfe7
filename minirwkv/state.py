"""The RNN state of a whole model: one named per-layer state per block, whatever the generation.

Each generation names what one layer remembers (``minirwkv.rwkv4.state.LayerState``: the shift inputs and the WKV's
(aa, bb, pp); RWKV-5/6/7: the shift inputs and the (B, H, N, N) matrix). ``State`` holds one per block and does
what the engine needs without knowing the fields: batch size, copies, row selection, flat arrays for saving.
Both modes build it: the parallel forward returns the state after its last token, and the RNN step maps a state
to the next one. Fields are named, never indexed as state[5*i+k].
"""
from __future__ import annotations

from typing import NamedTuple


class State(NamedTuple):
    layers: tuple  # one per-layer NamedTuple of (B, ...) arrays per block

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def layer_type(self) -> type:
        return type(self.layers[0])

    def copy(self) -> "State":
        return self.map(lambda a: a.copy())

    def map(self, f) -> "State":
        """The state with ``f`` applied to every array (e.g. row selection, a move to another device)."""
        return State(tuple(type(s)(*(f(a) for a in s)) for s in self.layers))

    def to_arrays(self) -> dict:
        """Flat {"blocks.i.att_x": array, ...} for saving (e.g. with numpy.savez)."""
        return {f"blocks.{i}.{f}": a for i, s in enumerate(self.layers) for f, a in zip(s._fields, s)}

    @classmethod
    def from_arrays(cls, arrays: dict, layer_type: type | None = None) -> "State":
        """The inverse of ``to_arrays``. ``layer_type``: the generation's per-layer state (None: the one whose field
        names the arrays carry, among the registered generations)."""
        if layer_type is None:
            from .generation import layer_type_for_fields

            layer_type = layer_type_for_fields({k.split(".", 2)[2] for k in arrays if k.count(".") >= 2})
        n = len({k.split(".")[1] for k in arrays})
        try:
            return cls(tuple(layer_type(*(arrays[f"blocks.{i}.{f}"] for f in layer_type._fields)) for i in range(n)))
        except KeyError as e:
            raise ValueError(f"incomplete RNN state: missing {e.args[0]!r}") from None
