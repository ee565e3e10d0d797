"""Attaching per-channel gates to a user's model from the outside, and removing them.

Like ``torch.nn.utils.parametrize``, the model stays a plain ``nn.Module``: gates live in
the method, and forward hooks on the graph's *host* modules multiply their output (or, for
an MLP's input group, their input) by the gate values. Two more rules keep a dead channel
exactly zero everywhere, so that the compacted network computes what the gated one does:

* a gated layer none of whose input slots is alive outputs nothing (purge), nor does an
  attention layer none of whose heads is open;
* a renormaliser (a BatchNorm that hosts no gate, a depthwise conv's bias, a sigmoid, a
  LayerNorm over the channels) has its output multiplied by the aliveness of its slots; a
  function is masked at the output of the module that returns it
  (:meth:`budgetprune.graph.ChannelGraph.mask_site`).

Both use the gate values of the current forward pass: in training one sample per example
(``sample="example"``) or one per batch (``sample="batch"``); at evaluation, and for
deterministic gates, one value per channel. The Hard Concrete gates of a network are sampled
together, once per pass (:class:`JointSamples`). :meth:`GateHooks.remove` restores the model
exactly.

A gate with one value per channel for the whole batch (a per-batch sample, a deterministic or
frozen gate) costs no pass over the feature maps where its host is a plain convolution, linear
layer or affine BatchNorm: z·(Wx + b) = (zW)x + zb, so for the length of the host's forward its
weight and bias are replaced by their products with z (as the attention heads' gates do with
the values), and given back after it, also when the forward fails. A per-example sample is
multiplied into the host's output as before.

A gate whose values are never negative (``gate.nonnegative``) is applied further down a
chain of ReLUs and poolings that only its host feeds, since z·relu(x) = relu(z·x) and
z·maxpool(x) = maxpool(z·x) for z ≥ 0, exactly also in floating point: the network computes
the same, but the product's saved tensors for backward are the pooled, smaller maps. Where no
pooling follows and a ReLU that works in place (torchvision's, timm's) is the one reader of a
convolution's, linear layer's or BatchNorm's output, the product is written into that output
instead (:func:`in_place_gate_host`, :mod:`budgetprune.gate_product`): the gates keep no map
of their own for backward.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import torch
from torch import nn

from . import layer_subclasses, norm_act
from .attention import Attention, value_scale
from .errors import ConfigError
from .gate_product import gate_product
from .gates import HardConcreteGate, open_in_every_row, piece_index, sample_joined
from .graph import ChannelGraph, ChannelGroup
from .liveness import alive
from .precision import float32

GateFn = Callable[[int], torch.Tensor]  # batch size -> (C,) or (batch, C) gate values


def _broadcast(z: torch.Tensor, like: torch.Tensor, expansion: int = 1, dim: int = 1) -> torch.Tensor:
    """Shape per-slot values (C,) or (N, C) to multiply a (N, C·expansion, ...) tensor, or a
    (N, ..., C) one when ``dim`` is -1 (tokens, channels-last maps)."""
    if expansion != 1:
        z = z.repeat_interleave(expansion, dim=-1)
    lead = z.shape[0] if z.dim() == 2 else 1
    if dim == -1:
        return z.reshape(lead, *([1] * (like.dim() - 2)), -1)
    return z.reshape(lead, -1, *([1] * (like.dim() - 2)))


#: Channel-wise, positively homogeneous modules a non-negative gate commutes with.
_POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
            nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
_COMMUTING = (nn.ReLU, *_POOLING)


#: Gate sampling in training: one sample per example and channel, or one per channel for the batch.
SAMPLES = ("example", "batch")


def check_gate_sample(sample) -> None:
    """Raise a one-line ConfigError unless ``sample`` is one of :data:`SAMPLES`."""
    if sample not in SAMPLES:
        raise ConfigError(f"gate_sample must be one of {', '.join(SAMPLES)} (--gate-sample on the command line), "
                          f"not {sample!r}")

#: Host modules whose parameters scale their output channels: a gate folds into them (exact types:
#: a subclass may transform its weight first, e.g. a weight-standardised convolution; a subclass is
#: one where it computes what its torch class computes, see :func:`fold_targets`).
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _module_calls(graph: ChannelGraph) -> dict[str, int]:
    """How many times the traced forward calls each module."""
    calls: dict[str, int] = {}
    for n in graph.gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    return calls


def fold_targets(module: nn.Module, channels: int) -> list[tuple[str, tuple[int, ...]]] | None:
    """(parameter name, shape of the factor) of each parameter of ``module`` that, multiplied by
    per-channel values z, multiplies its output channel c by z_c: the weight's rows (a
    convolution's or linear layer's output channels, an affine BatchNorm's scale) and the bias.
    None when ``module`` is not one whose output channels its parameters scale that way."""
    if type(module) not in _FOLDABLE and not (norm_act.acts_as_batchnorm(module) or norm_act.is_norm_act(module)
                                              or layer_subclasses.prunes_as_torch_layer(module)) \
            or hasattr(module, "parametrizations"):
        return None
    weight = module._parameters.get("weight")
    if weight is None or weight.shape[0] != channels:
        return None
    targets = [("weight", (-1,) + (1,) * (weight.dim() - 1))]
    if module._parameters.get("bias") is not None:
        targets.append(("bias", (-1,)))
    return targets


def gate_site(graph: ChannelGraph, host: str) -> str:
    """The last module of the chain host → ReLU / pooling → ... in which each module is called
    once and is the only reader of the one before (the host itself when there is none)."""
    modules = dict(graph.gm.named_modules())
    calls = _module_calls(graph)
    nodes = [n for n in graph.gm.graph.nodes if n.op == "call_module" and n.target == host]
    if len(nodes) != 1 or calls.get(host) != 1:
        return host
    node, site = nodes[0], host
    while len(node.users) == 1:
        (user,) = node.users
        if user.op != "call_module" or calls.get(user.target) != 1 or \
                not isinstance(modules[user.target], _COMMUTING) or user.args[0] is not node:
            break
        node, site = user, user.target
    return site


#: Activations that change a value (in place) only where their own backward passes no gradient.
_CLIPPING_MODULES = (nn.ReLU, nn.ReLU6)
_CLIPPING_FUNCTIONS = (nn.functional.relu, nn.functional.relu6)


def _clips_in_place(node, modules: dict[str, nn.Module]) -> bool:
    """Whether an FX node is a ReLU or a ReLU6 that overwrites its input."""
    if node.op == "call_module":
        module = modules.get(node.target)
        return isinstance(module, _CLIPPING_MODULES) and bool(module.inplace)
    if node.op == "call_function":
        if node.target is torch.relu_:
            return True
        inplace = node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False)
        return node.target in _CLIPPING_FUNCTIONS and inplace is True
    return node.op == "call_method" and node.target == "relu_"


def in_place_gate_host(graph: ChannelGraph, host: str) -> bool:
    """Whether a non-negative per-example gate is multiplied into ``host``'s output in place
    (:func:`budgetprune.gate_product.gate_product`): the host is a convolution, linear layer or
    BatchNorm called once (its backward keeps its input, not its output) and the one reader of
    its output is a ReLU or ReLU6 that works in place (torchvision's, timm's), so the gates keep
    no map of their own for backward. Before a ReLU with an output of its own the product would
    stay alive all the same, and a sum may be ``out += identity`` (the trace records it as the
    same ``add`` as ``out + identity``), which would overwrite the product: autograd's product there."""
    modules = dict(graph.gm.named_modules())
    if type(modules.get(host)) not in _FOLDABLE or _module_calls(graph).get(host) != 1:
        return False
    (node,) = [n for n in graph.gm.graph.nodes if n.op == "call_module" and n.target == host]
    if len(node.users) != 1:
        return False
    (user,) = node.users
    return _clips_in_place(user, modules) and user.args[0] is node and \
        sum(a is node for a in (*user.args, *user.kwargs.values())) == 1


def gate_values(gate: GateFn, batch_size: int | None, model_training: bool) -> torch.Tensor:
    """``gate(batch_size)``, sampled only while both the gate and the model it gates are training:
    ``model.eval()`` alone gives the deterministic gates a validation pass needs (the gates are the
    method's modules, not the model's, so the model's mode does not reach them)."""
    with float32(_device_of(gate)):  # gate values are float32 even inside a user's autocast region
        if model_training or not getattr(gate, "training", False):
            return gate(batch_size)
        gate.train(False)
        try:
            return gate(batch_size)
        finally:
            gate.train(True)


def _device_of(gate: GateFn) -> torch.device:
    """Where a gate module keeps its tensors (the CPU for a plain function)."""
    first = next(itertools.chain(gate.parameters(), gate.buffers()), None) if isinstance(gate, nn.Module) else None
    return first.device if first is not None else torch.device("cpu")


class JointSamples:
    """The training samples of many Hard Concrete gates, drawn together (:func:`budgetprune.gates.
    sample_joined`) at the first request of a forward pass: one chain of operations for all of
    them instead of one per gate, which is most of what sampling costs (an operation on a few
    hundred values costs about what it costs on thousands). Each sample serves one request; a gate
    asked again (a module called twice, a part of the model called on its own), or for another
    batch size, has all gates drawn anew, as gates sampled one by one would be. A gate that is
    frozen or in eval mode is not drawn. On the CPU each draw also notes which gates have an open
    unit in every example (counted for all of them at once): a layer whose input only such gates
    write is not purged, and :class:`GateHooks` skips the purge's product with 1 there. On an
    accelerator the count would be read back to the host every step, a wait for every kernel
    queued before it, so there the purge is computed everywhere (unmeasured on a GPU)."""

    _NONE = object()  # no draw yet in this pass (None is a batch size: one sample for the batch)

    def __init__(self, gates: Mapping[str, GateFn]):
        self.gates = {gid: g for gid, g in gates.items() if isinstance(g, HardConcreteGate)
                      and type(g).sample is HardConcreteGate.sample and type(g).forward is HardConcreteGate.forward}
        self.drawn: dict[str, torch.Tensor] = {}
        self.open_everywhere: set[str] = set()  # gates of the last draw with an open unit in every example
        self.pieces: dict[tuple, torch.Tensor] = {}  # per set of gates drawn together: each unit's gate
        self.batch = self._NONE

    def clear(self) -> None:
        self.drawn.clear()
        self.open_everywhere.clear()
        self.batch = self._NONE

    def get(self, gid: str, batch: int | None) -> torch.Tensor | None:
        """``gid``'s sample for ``batch`` (None: the gate is not one drawn jointly, or not sampling)."""
        gate = self.gates.get(gid)
        if gate is None or not gate.training or gate.frozen is not None:
            return None
        if self.batch is JointSamples._NONE or self.batch != batch or gid not in self.drawn:
            self._draw(batch)
        return self.drawn.pop(gid, None)

    def _draw(self, batch: int | None) -> None:
        self.drawn.clear()
        self.open_everywhere.clear()
        self.batch = batch
        sets: dict[tuple, list[str]] = {}
        for gid, g in self.gates.items():
            if g.training and g.frozen is None:
                key = (g.beta, g.gamma, g.zeta, g.log_alpha.device, g.log_alpha.dtype)
                sets.setdefault(key, []).append(gid)
        for key, gids in sets.items():
            gates = [self.gates[g] for g in gids]
            sizes = [g.num_channels for g in gates]
            with float32(key[3]):  # float32 even inside a user's autocast region, as gate_values
                joined = sample_joined(gates, batch)
            self.drawn.update(zip(gids, joined.split(sizes, dim=-1)))
            if joined.device.type != "cpu":
                continue  # reading the count back would wait for the accelerator's queue: purges computed
            pieces = self.pieces.get((key, *gids))
            if pieces is None:
                pieces = self.pieces[(key, *gids)] = piece_index(sizes, joined.device)
            self.open_everywhere.update(g for g, whole in zip(gids, open_in_every_row(joined, pieces)) if whole)


class GateHooks:
    """Forward hooks that apply ``gates[group_id]`` at each group's host module; in training each
    gate is sampled once per example (``sample="example"``) or once per batch (``"batch"``)."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, gates: Mapping[str, GateFn], sample: str = "example"):
        check_gate_sample(sample)
        modules = dict(model.named_modules())
        calls = _module_calls(graph)
        self.graph = graph
        self.per_batch = sample == "batch"
        # the gate values of the forward pass under way, detached; a gate is open where z ≠ 0 (a signed scale too)
        self.current: dict[str, torch.Tensor] = {}
        self.any_open: dict[str, tuple] = {}  # per group a purge reads: (its current, whether any gate is open)
        self.pending: dict[str, torch.Tensor] = {}  # gate values computed at a host, to multiply at its site
        self.whole: set[str] = set()  # current groups with an open unit in every example of the pass
        self.model_training = model.training  # of the forward pass under way
        self.in_place: set[str] = set()  # groups whose per-example product is written into the host's output
        # Hard Concrete gates of channel groups are sampled together, once per forward pass (JointSamples)
        self.joint = JointSamples({gid: gate for gid, gate in gates.items() if graph.groups[gid].position != "heads"})
        self.handles = [model.register_forward_pre_hook(self._reset)]
        # input gates first: a host's pre-hooks run in this order, and a folded output gate reads them (purge)
        for gid, gate in sorted(gates.items(), key=lambda item: graph.groups[item[0]].position != "input"):
            group = graph.groups[gid]
            host = modules[group.host]
            if group.position == "input":
                self.handles.append(host.register_forward_pre_hook(self._input_hook(gid, gate)))
            elif group.position == "heads":
                self.handles += self._head_hooks(host, modules, group, gate, graph.layers[group.producer].attention)
            else:
                layer = graph.layers[group.producer]
                nonnegative = getattr(gate, "nonnegative", False)
                site = modules[gate_site(graph, group.host)] if nonnegative else host
                # past a pooling the product is smaller; before an in-place ReLU it goes into the host's output
                in_place = nonnegative and not isinstance(site, _POOLING) and in_place_gate_host(graph, group.host)
                if in_place:
                    site = host
                    self.in_place.add(gid)
                before = norm_act.activation_site(host)  # a BatchNorm with its activation: the gate goes between
                if before is not None:
                    site, in_place = before, False
                targets = fold_targets(host, group.channels) if calls.get(group.host) == 1 and layer.heads is None \
                    else None
                if targets is None:
                    self.handles.append(site.register_forward_hook(self._output_hook(group, gate, layer.in_tensor,
                                                                                     layer.heads, in_place)))
                else:
                    self.handles += self._folding_hooks(host, site, group, gate, layer.in_tensor, targets, in_place,
                                                        site_input=before is not None)
        for name in graph.renormalisers:
            site, tensor = graph.mask_site(name)
            self.handles.append(modules[site].register_forward_hook(self._mask_hook(tensor)))

    def _reset(self, module, inputs):
        self.current.clear()
        self.any_open.clear()
        self.pending.clear()
        self.whole.clear()
        self.joint.clear()
        self.model_training = module.training

    def _values(self, gid: str, gate: GateFn, batch: int | None) -> torch.Tensor:
        """A gate's values for this pass: its share of the joint sample where it has one, else its own;
        notes in ``whole`` whether the joint sample has an open unit in every example."""
        z = self.joint.get(gid, batch) if self.model_training else None
        if z is not None and gid in self.joint.open_everywhere:
            self.whole.add(gid)
        else:
            self.whole.discard(gid)
        return z if z is not None else gate_values(gate, batch, self.model_training)

    def _batch(self, x: torch.Tensor) -> int | None:
        """The batch size a gate samples for (None: one sample for the batch)."""
        return None if self.per_batch else x.shape[0]

    def _alive(self, tensor: str) -> torch.Tensor:
        info = self.graph.tensors[tensor]
        return alive(info, {gid: self.current[gid] != 0 for gid in info.sources()})

    def _purge_sources(self, in_tensor: str) -> list[tuple[str, torch.Tensor | None]]:
        """The gated writers of a layer's input, each with the channels it writes there (None: all
        of them): the input is dead when none of those is open. Empty when something always
        writes it (the purge never applies)."""
        always, by_group = self.graph.tensors[in_tensor].writers
        if bool(always.any()):
            return []
        out = []
        for gid, (_, chans) in by_group.items():
            group = self.graph.groups.get(gid)
            whole = group is not None and chans.numel() == group.channels and \
                bool((chans.sort().values == torch.arange(group.channels)).all())
            out.append((gid, None if whole else chans))
        return out

    def _input_open(self, sources) -> torch.Tensor:
        """Whether any slot of a layer's input is alive in this pass: (batch, 1) or (1,) bools
        (``alive(...).amax(-1)`` for 0/1 gates, without building the per-slot aliveness)."""
        live = None
        for gid, chans in sources:
            cur = self.current[gid]
            if chans is None:  # the whole group: its any() serves every layer it reads (while it is current)
                seen, reduced = self.any_open.get(gid, (None, None))
                if seen is not cur:
                    reduced = cur.any(dim=-1, keepdim=True)
                    self.any_open[gid] = (cur, reduced)
                cur = reduced
            else:
                cur = cur.index_select(-1, chans.to(cur.device)).any(dim=-1, keepdim=True)
            live = cur if live is None else live | cur
        return live

    def _output_values(self, group: ChannelGroup, gate: GateFn, sources, heads: str | None,
                       batch: int | None) -> torch.Tensor:
        """A group's gate values for this pass, (channels,) or (batch, channels), with its layer
        purged when its input or its heads are all closed; records which are open."""
        z = group.expand(self._values(group.id, gate, batch))  # tied units → channels
        if sources and all(g in self.current for g, _ in sources) and \
                not all(chans is None and g in self.whole for g, chans in sources):  # else: open in every example
            z = z * self._input_open(sources)  # purge (a float times a bool keeps the float's dtype)
            self.whole.discard(group.id)
        if heads in self.current:  # an attention without heads outputs nothing (its biases: purged too)
            z = z * self.current[heads].any(dim=-1, keepdim=True)
            self.whole.discard(group.id)
        self.current[group.id] = z.detach()
        return z

    def _output_hook(self, group: ChannelGroup, gate: GateFn, in_tensor: str, heads: str | None = None,
                     in_place: bool = False):
        sources = self._purge_sources(in_tensor)  # the gates that can kill this layer's input

        def hook(module, inputs, output):
            rest = None
            if isinstance(output, tuple):  # nn.MultiheadAttention: (output, attention weights)
                output, rest = output[0], output[1:]
            z = self._output_values(group, gate, sources, heads, self._batch(output))
            # autocast: the product stays bf16/fp16
            gated = gate_product(output, _broadcast(z.to(output.dtype), output, dim=group.dim), in_place)
            return gated if rest is None else (gated, *rest)
        return hook

    def _folding_hooks(self, host: nn.Module, site: nn.Module, group: ChannelGroup, gate: GateFn, in_tensor: str,
                       targets: list[tuple[str, tuple[int, ...]]], in_place: bool = False,
                       site_input: bool = False) -> list:
        """Hooks of a group whose host's parameters scale its output channels: values with one
        entry per channel are folded into the host's weight and bias for the length of its
        forward (no pass over the feature maps); per-example values are multiplied in at the
        site, as :meth:`_output_hook` does, into its input where ``site_input`` (the activation
        of a BatchNorm that has one, :mod:`budgetprune.norm_act`)."""
        gid = group.id
        sources = self._purge_sources(in_tensor)
        saved: list[tuple[str, torch.Tensor]] = []

        def fold(module, inputs):
            z = self._output_values(group, gate, sources, None, self._batch(inputs[0]))
            if z.dim() != 1:
                self.pending[gid] = z
                return
            for attr, shape in targets:
                original = module._parameters[attr]
                saved.append((attr, original))
                module._parameters[attr] = original * z.to(original.device, original.dtype).view(shape)

        def restore(module, inputs, output):
            while saved:
                attr, original = saved.pop()
                module._parameters[attr] = original

        def multiply(module, inputs, output):
            z = self.pending.pop(gid, None)
            if z is None:  # folded
                return output
            return gate_product(output, _broadcast(z.to(output.dtype), output, dim=group.dim), in_place)

        def multiply_input(module, inputs):
            z = self.pending.pop(gid, None)
            if z is None:  # folded
                return None
            x = inputs[0]
            return (gate_product(x, _broadcast(z.to(x.dtype), x, dim=group.dim)),) + tuple(inputs[1:])

        return [host.register_forward_pre_hook(fold), host.register_forward_hook(restore, always_call=True),
                site.register_forward_pre_hook(multiply_input) if site_input else site.register_forward_hook(multiply)]

    def _input_hook(self, gid: str, gate: GateFn):
        def hook(module, inputs):
            x = inputs[0]
            z = self._values(gid, gate, self._batch(x))
            self.current[gid] = z.detach()
            return (x * _broadcast(z.to(x.dtype), x),) + tuple(inputs[1:])
        return hook

    def _head_hooks(self, host: nn.Module, modules: dict[str, nn.Module], group: ChannelGroup, gate: GateFn,
                    spec: Attention) -> list:
        """An attention's head gates z_h scale the values of head h: for the length of the host's
        forward its query/key/value weight and bias are replaced by their product with
        :func:`budgetprune.attention.value_scale` (one gate sample per batch: the weights are shared
        by every example), then given back, also when the forward fails."""
        owners = []
        for path, shape in ((spec.qkv_weight, (-1, 1)), (spec.qkv_bias, (-1,))):
            if path is not None:
                owner_path, _, attr = path.rpartition(".")
                owners.append((modules[owner_path], attr, shape))
        saved: list[tuple[nn.Module, str, torch.Tensor]] = []

        def scale(module, inputs):
            z = gate_values(gate, 1, self.model_training)  # one sample for the batch
            z = z.reshape(-1, z.shape[-1])[0]
            self.current[group.id] = z.detach()
            factors = value_scale(spec.head_dim, z)
            for owner, attr, shape in owners:
                original = owner._parameters[attr]
                saved.append((owner, attr, original))
                owner._parameters[attr] = original * factors.to(original.device, original.dtype).view(shape)

        def restore(module, inputs, output):
            while saved:
                owner, attr, original = saved.pop()
                owner._parameters[attr] = original

        return [host.register_forward_pre_hook(scale), host.register_forward_hook(restore, always_call=True)]

    def _mask_hook(self, tensor: str):
        info = self.graph.tensors[tensor]

        def hook(module, inputs, output):
            if not all(g in self.current for g in info.sources()):
                return output
            live = self._alive(tensor).to(output.dtype)
            return output * _broadcast(live, output, info.expansion, info.dim)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
