"""A short MTARD distillation, run by tests/test_mtard_distributed.py in one process or under `torchrun` on two (gloo,
CPU): `python _distributed_mtard.py OUT BS`. Each process saves its student and its adaptive weight to OUT."""
import atexit, dataclasses, json, sys
from pathlib import Path
import torch
from fastai.torch_core import rank_distrib
from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import synth_dls
from igdmfast.learner import distill_learner
from igdmfast.methods import get_method
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _distributed_fit import net   # noqa: E402  (no BatchNorm: a step is the same whether the batch is split or not)


def main(out, bs):
    torch.set_num_threads(1)
    seed_everything(0)
    dls = synth_dls(n_train=16, n_valid=8, n_classes=4, bs=bs, device='cpu')
    teacher, nat, student = net().requires_grad_(False), net(width=6).requires_grad_(False), net()
    mtard = dataclasses.replace(get_method('mtard'), random_start='none')   # x′ then depends on the sample only
    learn = distill_learner(teacher, student, dls, method=mtard, igdm=False, nat_teacher=nat, check_teacher=False, lr=1e-2,
                            threat=ThreatModel.from_255(8, 2, n_steps=3), loss_kwargs=dict(weight_lr=0.5))
    with learn.no_bar(), learn.distrib_ctx(sync_bn=False): learn.fit(3)
    rank, out = rank_distrib(), Path(out)
    torch.save({k: v.detach().clone() for k, v in learn.model.state_dict().items()}, out/f'student_rank{rank}.pt')
    (out/f'w_rank{rank}.json').write_text(json.dumps(float(learn.adv_distill.state.nat_weight)))
    if torch.distributed.is_initialized(): atexit._run_exitfuncs()


if __name__ == '__main__': main(sys.argv[1], int(sys.argv[2]))
