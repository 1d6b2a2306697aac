"""A short IGDM distillation, run by tests/test_distributed.py either in one process or under `torchrun` on several
(gloo, CPU): `python _distributed_fit.py OUT BS`. Each process saves its student and its logged epoch values to OUT."""
import atexit, dataclasses, json, sys
from pathlib import Path
import torch
from torch import nn
from fastai.torch_core import rank_distrib
from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import synth_dls
from igdmfast.learner import distill_learner
from igdmfast.methods import get_method


def net(n_classes=4, width=8):
    "A small CNN without BatchNorm: its training step is the same whether a batch is split over processes or not."
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, n_classes))


def main(out, bs):
    torch.set_num_threads(1)
    seed_everything(0)
    dls = synth_dls(n_train=16, n_valid=8, n_classes=4, bs=bs, device='cpu')
    teacher, student = net().requires_grad_(False), net()
    # no random start: the attack then depends only on the weights and the sample, not on how the batch is split
    ard = dataclasses.replace(get_method('ard'), random_start='none')
    learn = distill_learner(teacher, student, dls, method=ard, igdm=True, alpha=2., threat=ThreatModel.from_255(8, 2, n_steps=3),
                            check_teacher=False, lr=1e-2)
    with learn.no_bar(), learn.distrib_ctx(sync_bn=False): learn.fit(2)
    rank, out = rank_distrib(), Path(out)
    torch.save({k: v.detach().clone() for k, v in learn.model.state_dict().items()}, out/f'student_rank{rank}.pt')
    names = list(learn.recorder.metric_names[1:-1])
    (out/f'log_rank{rank}.json').write_text(json.dumps([dict(zip(names, map(float, row))) for row in learn.recorder.values]))
    if torch.distributed.is_initialized():   # a launch of several processes: the exit handlers must leave the group
        atexit._run_exitfuncs()
        (out/f'group_rank{rank}.json').write_text(json.dumps(dict(left_at_exit=not torch.distributed.is_initialized())))


if __name__ == '__main__': main(sys.argv[1], int(sys.argv[2]))
