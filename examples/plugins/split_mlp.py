"""Net2Net's split of MLP units: `mptc grow --plugin examples/plugins/split_mlp.py -p "split_mlp(units = [0, 3])"`."""

from dataclasses import dataclass, field, replace

import torch

from mptc.passes import KNOWN_ROLES, Change, Pass, PassRefused, along, layer_list, register, spec_of


@register
@dataclass
class SplitMLP(Pass):
    """Each chosen unit gets a copy: its up (and gate) rows copied, its down columns halved on both."""

    name = "split_mlp"
    handles = KNOWN_ROLES
    units: list[int] = field(default_factory=lambda: [0])
    layers: list[int] | None = None

    def requires(self, model):
        super().requires(model)
        for i in layer_list(model, self.layers, self.name):
            mlp = spec_of(model).layers[i].mlp
            ok = self.units and len(set(self.units)) == len(self.units) and all(0 <= u < mlp.hidden for u in self.units)
            if mlp.nested or not ok:
                raise PassRefused(f"split_mlp: units must be distinct indices 0..{mlp.hidden - 1} of layer {i}'s "
                                  f"un-nested MLP, got {self.units}")

    def change(self, model):
        spec, units = spec_of(model), torch.tensor(self.units)
        maps, halves = {}, {}
        for i in layer_list(model, self.layers, self.name):
            f = spec.layers[i].mlp.hidden
            maps[f"F[{i}]"] = torch.cat([torch.arange(f), units])  # the copies go last: new unit f + k is units[k]
            halves[i] = torch.ones(f + len(units)).index_fill_(0, units, 0.5)
            halves[i][f:] = 0.5  # both halves of a split unit write half of what it wrote
        new = spec.replace(layers=tuple(replace(ly, mlp=replace(ly.mlp, hidden=ly.mlp.hidden + len(units)))
                                        if i in halves else ly for i, ly in enumerate(spec.layers)))
        return Change(new, maps, scale=lambda name, info: along(info, f"F[{info.layer}]", halves[info.layer])
                      if info.role == "mlp.down" and info.layer in halves else 1.0)
