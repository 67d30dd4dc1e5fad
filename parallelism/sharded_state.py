"""This rank's model and optimizer tensors as entries of one layout-free state.

Every entry is named and shaped as in the single-process model, so a checkpoint written under
one TP x PP x DP layout loads under any other: torch.distributed.checkpoint (DCP) matches
saved and requested pieces by name and offset, and reads only the overlap.

  model/<name>[/<block>]            a weight; fused weights (qkv, gate_up) as one entry per
                                    block (q, k, v / gate, up), because a rank's TP shard holds
                                    a slice of every block -- DTensor `Shard(dim)` over the TP
                                    group describes each block exactly
  optim/<state>/<name>[/<block>]    AdamW moments, laid out like the weight; `step` per weight
  rng/<rank>                        this rank's generator state (used by an identical layout)

PP stages contribute their own layers under single-process names (`global_name`); DP
replicas write the same entries and DCP keeps one copy. Under ZeRO, DeepSpeed's
`safe_get/set_full_*` turn its flat partitions into per-weight tensors (fp32 master weights
and moments), so ZeRO checkpoints reshard like any other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from core.weight_layout import Split, fused_blocks, split_for
from parallelism.pipeline import global_name
from parallelism.topology import Topology

Entries = dict[str, Tensor]


class ShardedState:
    """Maps the trainer's parameters (and optimizer) to checkpoint entries and back."""

    def __init__(self, model: nn.Module, topo: Topology, optimizer=None, engine=None):
        self.model, self.topo, self.optimizer, self.engine = model, topo, optimizer, engine
        self.cfg = model.cfg
        self.params = {global_name(model, n): p for n, p in model.named_parameters()}
        self.mesh = DeviceMesh.from_group(topo.tp_group, "cpu") if topo.tp > 1 else None

    # ---- one tensor <-> its entries -------------------------------------------------------

    def _blocks(self, name: str) -> tuple[Split | None, tuple[str, ...]]:
        split = split_for(self.cfg, name)
        if split is None:
            return None, ("",)
        return split, fused_blocks(name)

    def entries(self, prefix: str, name: str, local: Tensor) -> Entries:
        """`local` (this rank's shard of weight `name`, or a tensor laid out like it) cut into
        its layout-free entries."""
        split, blocks = self._blocks(name)
        key = f"{prefix}/{name}"
        if split is None:
            return {key: local}
        tp = self.topo.tp
        sizes = [p // tp for p in split.parts]
        out = {}
        for block, piece in zip(blocks, local.split(sizes, dim=split.dim), strict=True):
            piece = piece.contiguous()
            if tp > 1:
                shape = list(piece.shape)
                shape[split.dim] *= tp
                piece = DTensor.from_local(piece, self.mesh, [Shard(split.dim)], run_check=False,
                                           shape=torch.Size(shape),
                                           stride=torch.empty(shape, device="meta").stride())
            out[f"{key}/{block}" if block else key] = piece
        return out

    def assemble(self, name: str, entries: Entries) -> Tensor:
        """This rank's shard of `name` from its (loaded) entries."""
        split, _ = self._blocks(name)
        pieces = [t.to_local() if isinstance(t, DTensor) else t for t in entries.values()]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=split.dim)

    # ---- the whole state --------------------------------------------------------------------

    def _inner(self):
        """DeepSpeed's wrapped torch optimizer and its flat fp32 partitions (ZeRO only)."""
        zero = self.engine.optimizer
        return zero.optimizer, zero.single_partition_of_fp32_groups

    def _relink(self) -> None:
        """Point every weight's DeepSpeed view at the moments of its partition. DeepSpeed
        links them once, right after the first group's first step -- before the other
        groups' moments exist -- so the later groups' views come out empty."""
        self.engine.optimizer._hp_optimizer_states_linked = False
        self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    def _weight(self, p: nn.Parameter) -> Tensor:
        if self.engine is None:
            return p.detach()
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)  # the fp32 master (== p in fp32 training)

    def _moments(self, p: nn.Parameter) -> dict[str, Tensor]:
        """The optimizer state of one weight (empty before its first step)."""
        if self.engine is None:
            return dict(self.optimizer.state.get(p, {})) if self.optimizer is not None else {}
        from deepspeed.utils import safe_get_full_optimizer_state

        inner, flats = self._inner()
        state = inner.state.get(flats[0], {})
        out = {k: safe_get_full_optimizer_state(p, k) for k in sorted(state) if k != "step"}
        if "step" in state:
            out["step"] = state["step"].clone()
        return out

    def state_dict(self) -> Entries:
        """Every entry this rank holds (collective under ZeRO: call on all ranks)."""
        out: Entries = {}
        if self.engine is not None:
            self._relink()
        for name, p in self.params.items():
            out.update(self.entries("model", name, self._weight(p)))
            if not p.requires_grad:
                continue
            for key, value in self._moments(p).items():
                if value.dim() == 0:
                    out[f"optim/{key}/{name}"] = value
                else:
                    out.update(self.entries(f"optim/{key}", name, value))
        out[f"rng/{self.topo.rank}"] = torch.get_rng_state()
        return out

    def targets(self, saved: dict[str, torch.Size], optimizer: bool = True) -> dict[str, Entries]:
        """Empty entries to load into, grouped by what they fill ('model/x', 'optim/k/x');
        `saved` maps the checkpoint's entries to their global shapes. Optimizer state is
        requested only where the checkpoint has it."""
        groups: dict[str, Entries] = {}
        moments = sorted({k.split("/")[1] for k in saved if k.startswith("optim/")})
        for name, p in self.params.items():
            like = torch.empty_like(p.detach(), device="cpu")
            groups[f"model/{name}"] = self.entries("model", name, like)
            for key in moments if optimizer and p.requires_grad else ():
                scalar = f"optim/{key}/{name}"
                if scalar in saved and len(saved[scalar]) == 0:  # step
                    groups[scalar] = {scalar: torch.zeros(())}
                    continue
                entries = self.entries(f"optim/{key}", name, torch.empty_like(like))
                if all(k in saved for k in entries):
                    groups[scalar] = entries
        rng = f"rng/{self.topo.rank}"
        if rng in saved and optimizer:
            groups[rng] = {rng: torch.empty_like(torch.get_rng_state())}
        return groups

    def load(self, groups: dict[str, Entries], same_layout: bool) -> None:
        """Copy loaded entries into the model, the optimizer and (same layout only) the RNG."""
        state: dict[nn.Parameter, dict[str, Tensor]] = {}
        for group, entries in groups.items():
            kind, rest = group.split("/", 1)
            if kind == "rng":
                if same_layout:
                    torch.set_rng_state(entries[group])
                continue
            key, name = rest.split("/", 1) if kind == "optim" else ("", rest)
            value = self.assemble(name, entries)
            p = self.params[name]
            if kind == "model":
                with torch.no_grad():
                    p.copy_(value)
            else:
                # AdamW keeps `step` on the CPU unless capturable/fused; moments live with p
                state.setdefault(p, {})[key] = value if key == "step" else value.to(p.device)
        if self.engine is not None:
            self._load_zero(state)
        else:
            for p, s in state.items():
                self.optimizer.state[p] = s

    def _load_zero(self, state: dict[nn.Parameter, dict[str, Tensor]]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        inner, flats = self._inner()
        for p in self.params.values():
            if p.requires_grad:
                safe_set_full_fp32_param(p, p.detach().float())
        if not state:
            return
        keys = next(iter(state.values()))
        for flat in flats:  # AdamW's lazily created state, then DeepSpeed's per-weight views
            inner.state[flat] = {k: (v.clone() if k == "step" else torch.zeros_like(flat))
                                 for k, v in keys.items()}
        self._relink()
        for p, s in state.items():
            for k, v in s.items():
                if k != "step":
                    safe_set_full_optimizer_state(p, v, k)
