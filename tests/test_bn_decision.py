"Issue #26: the library's default `igdm_bn` is the one `experiments/bn/decide.py` derived from the run folders by the pre-registered rule."
import inspect, json
import torch
from pathlib import Path
from igdmfast.callback.adversarial import AdvDistill, IGDM_BN, resolve_igdm_bn
from igdmfast.learner import distill_learner

DECISION = Path(__file__).resolve().parents[1]/'experiments'/'bn'/'decision.json'

def test_default_igdm_bn_is_the_decision():
    "What the default `igdm_bn` runs is decision.json's default; the paper's protocol and SAAD keep the official 'update'."
    from igdmfast.cli import train
    from igdmfast.runs import distill_student
    from igdmfast.methods import METHODS
    d = json.loads(DECISION.read_text())
    assert d['default'] in IGDM_BN and d['commit'] and d['rule']
    assert d['variant'] is None or d['variant'] in IGDM_BN
    for f in (AdvDistill.__init__, distill_learner, distill_student, train):
        default = inspect.signature(f).parameters['igdm_bn'].default
        for name, m in METHODS.items():
            assert resolve_igdm_bn(default, name, 'paper') == 'update', (f.__qualname__, name)   # the official code's, always
            assert resolve_igdm_bn(default, name, 'fastai') == ('update' if m.igdm_builtin else d['default']), (f.__qualname__, name)
    assert AdvDistill("ard", torch.nn.Linear(2, 2), igdm=True).igdm_bn == d["default"]

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

def _decide_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location('bn_decide', DECISION.parent/'decide.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def _settings(*per_setting, complete=True):
    "Synthetic settings: each argument maps a method to (mean, low) of VARIANT − update; `high` never enters the rule."
    return [dict(name=f's{i}', complete=complete, methods={m: dict(variant_minus_update=dict(mean=mean, low=low, high=mean + 1))
                                                           for m, (mean, low) in d.items()}) for i, d in enumerate(per_setting)]

def test_decision_rule_as_preregistered():
    "decide() applies README.md's rule: VARIANT iff every mean (both settings, every method) is above -1 and one setting has every interval above 0."
    decide = _decide_module().decide
    s1_sup = {'ard': (8.8, 4.9), 'rslad': (5.7, 1.9), 'adaad': (3.4, 2.1)}   # every interval above 0
    s2_ok, s2_sup = {'ard': (-0.2, -3.0), 'adaad': (-0.9, -2.5)}, {'ard': (2.0, 0.5), 'adaad': (1.0, 0.1)}
    assert decide(_settings(s1_sup, s2_ok), 'keep')[0] == 'keep'               # non-inferior everywhere, superior in setting 1
    assert decide(_settings(s1_sup, s2_sup), 'keep')[0] == 'keep'
    assert decide(_settings({**s1_sup, 'ard': (0.5, -0.1)}, s2_sup), 'keep')[0] == 'keep'   # superior in setting 2 only
    d, why = decide(_settings(s1_sup, {**s2_ok, 'adaad': (-1.2, -4.0)}), 'keep')
    assert d == 'update' and 'non-inferiority fails' in why                     # one method's mean at or below -1 decides
    assert decide(_settings(s1_sup, {**s2_ok, 'adaad': (-1.0, -4.0)}), 'keep')[0] == 'update'   # "above -1" is strict
    assert decide(_settings(s1_sup, {**s2_ok, 'adaad': (-0.99, -4.0)}), 'keep')[0] == 'keep'
    d, why = decide(_settings({**s1_sup, 'ard': (0.5, -0.1)}, s2_ok), 'keep')
    assert d == 'update' and 'superiority fails' in why and 'non-inferiority holds' in why   # no setting wholly above 0
    d, why = decide(_settings(s1_sup, s2_sup)[:1] + _settings(s2_sup, complete=False), 'keep')
    assert d == 'update' and 'not applied yet' in why                           # applied only when every seed is in
    assert decide(_settings(s1_sup), 'keep')[0] == 'update'                      # both settings are needed
    assert decide(_settings(s1_sup, s2_sup), None)[0] == 'update'                # no pilot choice, no change
    assert decide(_settings(s1_sup, s2_sup), 'keep', blocked='no teacher passed')[0] == 'update'

def test_readme_quotes_the_grid():
    "The README's IGDM paragraph quotes the grid's `keep` − `update` means and AdaAD's `keep` − base at 64/255 as decision.json has them."
    d = json.loads(DECISION.read_text())
    S = {s['name']: s for s in d['settings']}
    assert all(s['complete'] for s in S.values()) and d['variant'] == 'keep'
    text = ' '.join((DECISION.parents[2]/'README.md').read_text().split())   # the paragraph's line breaks do not matter
    num = lambda x: f"{x:+.2f}".replace('-', '−')
    mean = lambda s, m, k='variant_minus_update': num(S[s]['methods'][m][k]['mean'])
    assert (f"over {len(S['digits']['seeds'])} seeds, `'keep'` − `'update'` was {mean('digits', 'ard')}, {mean('digits', 'rslad')} "
            f"and {mean('digits', 'adaad')} points for ARD, RSLAD and AdaAD") in text
    iv = lambda s, m, k: (lambda x: f"{num(x['mean'])} [{num(x['low'])}, {num(x['high'])}]")(S[s]['methods'][m][k])
    assert (f"over {len(S['cifar']['seeds'])} seeds, it was {iv('cifar', 'ard', 'variant_minus_update')} and "
            f"{iv('cifar', 'adaad', 'variant_minus_update')} for ARD and AdaAD") in text
    assert f"AdaAD's student was {iv('digits', 'adaad', 'variant_minus_base')} points against the student without IGDM" in text
    assert (f"IGDM added {iv('cifar', 'ard', 'variant_minus_base')} (ARD) and {iv('cifar', 'adaad', 'variant_minus_base')} (AdaAD) "
            "points over the student without it") in text
    assert ("AdaAD's interval reaches below it" in text) == (S['cifar']['methods']['adaad']['variant_minus_update']['low'] <= -1)
    assert (f"`'{d['default']}'` (the default" in text) or (d['default'] == 'keep' and "The default, `'auto'`, is `'keep'`" in text)

def test_cli_help_quotes_the_grid():
    "`--igdm-bn`'s help gives the default's reason with the grid's range of `keep` − `update` means per setting, as decision.json has them."
    from fastcore.docments import docments
    from igdmfast.cli import _distill_options
    d = json.loads(DECISION.read_text())
    help_ = docments(_distill_options)['igdm_bn']
    assert f"auto is '{d['default']}'" in help_
    S = {s['name']: sorted(x['variant_minus_update']['mean'] for x in s['methods'].values()) for s in d['settings']}
    n = {s['name']: len(s['seeds']) for s in d['settings']}
    assert f"{S['digits'][0]:+.2f} to {S['digits'][-1]:+.2f} AutoAttack points over 'update' at 64/255 over {n['digits']} seeds" in help_
    assert f"{S['cifar'][0]:+.2f} to {S['cifar'][-1]:+.2f} at 8/255 over {n['cifar']}:" in help_
