"Issue #26: the library's default `igdm_bn` is the one `experiments/bn/decide.py` derived from the run folders by the pre-registered rule."
import inspect, json
from pathlib import Path
from igdmfast.callback.adversarial import AdvDistill, IGDM_BN
from igdmfast.learner import distill_learner

DECISION = Path(__file__).resolve().parents[1]/'experiments'/'bn'/'decision.json'

def test_default_igdm_bn_is_the_decision():
    d = json.loads(DECISION.read_text())
    assert d['default'] in IGDM_BN and d['commit'] and d['rule']
    assert d['variant'] is None or d['variant'] in IGDM_BN
    for f in (AdvDistill.__init__, distill_learner):
        assert inspect.signature(f).parameters['igdm_bn'].default == d['default'], f.__qualname__
    from igdmfast.cli import train
    assert inspect.signature(train).parameters['igdm_bn'].default == d['default']

def test_decision_is_the_scripts_output():
    "decision.json is what decide.py writes from the run folders now (never edited by hand)."
    import runpy
    before = DECISION.read_text()
    runpy.run_path(str(DECISION.parent/'decide.py'), run_name='__main__')
    assert DECISION.read_text() == before, "decision.json is stale: rerun experiments/bn/decide.py and commit it"

def test_readme_quotes_the_pilot():
    "The README's IGDM paragraph quotes the pilot's numbers as decision.json has them (never typed apart from the data)."
    import re
    d = json.loads(DECISION.read_text())['pilot']
    readme = (DECISION.parents[2]/'README.md').read_text()
    m = re.search(r"`'keep'` gained ([\d.]+) AutoAttack points over `'update'`\s+and ([\d.]+) over the student without IGDM", readme)
    assert m, "README.md's IGDM paragraph no longer quotes the pilot"
    assert d['choice'] == 'keep'
    assert m.group(1) == f"{d['minus_update']['keep']['mean']:.2f}" and m.group(2) == f"{d['minus_base']['keep']['mean']:.2f}"
