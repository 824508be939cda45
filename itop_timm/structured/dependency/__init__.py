"""torch-pruning's dependency graph seen as plain tensor slices, one concept per module.

* :mod:`.tracing` — run an example input and build the ``DependencyGraph``;
* :mod:`.slices` — :class:`ChannelSlice`: a group item as positions of parameter tensors;
* :mod:`.exactness` — whether removing a zero channel leaves the outputs unchanged;
* :mod:`.classes` — channels that can only be removed together;
* :mod:`.groups` — :class:`ChannelGroup` and the traced groups of a model;
* :mod:`.units` — :class:`ChannelUnit`: the groups a method may remove from a live model (Chase).
"""

from .groups import ChannelGroup, ChannelTrace, TracedGroup, coupled_channel_groups, trace_channel_groups
from .slices import ChannelSlice, channel_numel, group_item_slices, per_position
from .tracing import (
    MAX_TRACE_BYTES,
    MAX_TRACE_ELEMENTS,
    build_graph,
    call_model,
    check_input_size,
    check_trace_memory,
    model_label,
    run_example,
    trace_memory_bytes,
    tracing_state,
)
from .units import ChannelUnit, default_input_size, removable_units

__all__ = [
    "ChannelGroup",
    "ChannelSlice",
    "ChannelTrace",
    "ChannelUnit",
    "removable_units",
    "default_input_size",
    "TracedGroup",
    "coupled_channel_groups",
    "trace_channel_groups",
    "group_item_slices",
    "channel_numel",
    "per_position",
    "build_graph",
    "call_model",
    "model_label",
    "run_example",
    "tracing_state",
    "check_input_size",
    "check_trace_memory",
    "trace_memory_bytes",
    "MAX_TRACE_ELEMENTS",
    "MAX_TRACE_BYTES",
]
