"Shared test settings: every test process (and every process it starts) uses one CPU thread."
import os
import torch

# The tests use small models on a shared 2-core machine, where contending OpenMP threads only spin (several times
# slower), and two xdist workers with two threads each would oversubscribe it. One thread also keeps CPU reductions
# in the same order in every process, which the bit-for-bit resume tests rely on.
os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = '1'
torch.set_num_threads(1)

# AutoSpeed's on-disk cache of measured layouts/precisions: a fresh folder per test session (and its subprocesses),
# never the user's ~/.cache/igdmfast
import tempfile
os.environ['IGDMFAST_CACHE'] = tempfile.mkdtemp(prefix='igdmfast-cache-')


# The longest files first, so that with `pytest -n 2 --dist loadfile` they start at once instead of ending alone.
SLOW_FIRST = ('test_main_job.py', 'test_cli.py', 'test_evaluate_protocol.py', 'test_docs.py', 'test_paper_protocol.py',
              'test_cli_safety.py', 'test_robustbench.py', 'test_robustbench_cli.py', 'test_compare_seeds.py', 'test_distill_steps.py')


def pytest_collection_modifyitems(session, config, items):
    rank = lambda item: SLOW_FIRST.index(item.path.name) if item.path.name in SLOW_FIRST else len(SLOW_FIRST)
    items.sort(key=rank)   # stable: the order inside each file is kept
