"""Tests of `igdmfast.stats` on known inputs: every interval against scipy's own implementation or a closed form worked
here, the paired difference of a run with itself, the evaluation-noise warning, one seed, JSON and the plot."""
import json
import math
import os

os.environ.setdefault('MPLBACKEND', 'Agg')

import numpy as np
import pytest
from scipy import stats as st

from igdmfast.stats import (accuracy_ci, aggregate_compare, binomial_ci, compare_markdown, effect_within_noise, eval_noise,
                            is_accuracy, mean_ci, paired_diff, plot_seeds)


def wilson(c, n, z=1.959963984540054):
    "The Wilson score interval worked by hand: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), in %."
    p = c / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def rows_of(table, n=1000, n_aa=100):
    "Rows as `igdmfast compare --seeds` gives them, from (method, igdm, seed, clean, pgd20, aa) tuples."
    return [dict(method=m, igdm=ig, seed=s, clean=c, pgd20=p, aa=a, n=n, n_aa=n_aa, gd=0.1, gc=0.5, seconds_per_epoch=3.0)
            for m, ig, s, c, p, a in table]


def test_mean_ci_against_scipy():
    v = [40.1, 42.3, 41.0, 39.7, 43.2]
    for conf in (0.95, 0.9):
        r = mean_ci(v, conf)
        lo, hi = st.t.interval(conf, len(v) - 1, loc=np.mean(v), scale=st.sem(v))
        assert r['mean'] == pytest.approx(np.mean(v), abs=1e-12) and r['std'] == pytest.approx(np.std(v, ddof=1), abs=1e-12)
        assert (r['low'], r['high']) == pytest.approx((lo, hi), abs=1e-10)
        assert r['half_width'] == pytest.approx((hi - lo) / 2, abs=1e-10) and r['n'] == 5 and r['interval'] == 'Student t'
    # closed form with the tabulated t(0.975, 2) = 4.302653
    r = mean_ci([1.0, 2.0, 4.0])
    assert r['half_width'] == pytest.approx(4.302653 * math.sqrt(7 / 3) / math.sqrt(3), abs=1e-5)


def test_mean_ci_one_seed_and_bad_input():
    r = mean_ci([41.5])
    assert r['mean'] == 41.5 and r['n'] == 1 and r['std'] is None and r['low'] is None and r['half_width'] is None
    assert 'no interval' in r['note']
    with pytest.raises(ValueError, match='empty'): mean_ci([])
    with pytest.raises(ValueError, match='finite'): mean_ci([1.0, math.inf])
    with pytest.raises(TypeError, match='numbers'): mean_ci([1.0, None])
    with pytest.raises(ValueError, match='conf'): mean_ci([1.0, 2.0], conf=95)


def test_paired_diff_against_scipy_ttest_rel():
    a, b = [43.0, 44.1, 42.2, 41.0], [40.1, 41.3, 42.9, 38.0]
    r = paired_diff(a, b)
    ci = st.ttest_rel(a, b).confidence_interval(0.95)
    assert (r['low'], r['high']) == pytest.approx((ci.low, ci.high), abs=1e-10)
    assert r['diffs'] == pytest.approx([2.9, 2.8, -0.7, 3.0]) and r['mean'] == pytest.approx(8.0 / 4)
    assert (r['positive'], r['negative'], r['zero'], r['agree']) == (3, 1, 0, 3) and r['interval'] == 'paired t'
    assert r['excludes_zero'] == (ci.low > 0 or ci.high < 0)
    with pytest.raises(ValueError, match='same seeds'): paired_diff([1, 2, 3], [1, 2])


def test_paired_diff_of_a_run_with_itself_is_exactly_zero():
    v = [40.1, 42.3, 41.0, 39.9]
    r = paired_diff(v, list(v))
    assert r['diffs'] == [0.0] * 4 and r['mean'] == 0.0 and r['std'] == 0.0 and (r['low'], r['high']) == (0.0, 0.0)
    assert (r['positive'], r['negative'], r['zero'], r['agree'], r['excludes_zero']) == (0, 0, 4, 4, False)
    # the same through the aggregate: two variants that are the same numbers give zero differences and no warning of an effect
    rows = rows_of([('ard', ig, s, 80.0 + s, 40.0 + s, 30.0 + s) for s in range(3) for ig in (False, True)])
    d = aggregate_compare(rows)['differences'][0]['metrics']
    for k in ('clean', 'pgd20', 'aa', 'gd', 'gc', 'seconds_per_epoch'):
        assert d[k]['diffs'] == [0.0] * 3 and d[k]['low'] == 0.0 and d[k]['high'] == 0.0, k


def test_binomial_ci_wilson():
    for c, n in [(15, 100), (0, 20), (20, 20), (1, 1), (512, 1000), (3, 10_000)]:
        b = binomial_ci(c, n)
        lo, hi = wilson(c, n)
        assert (b['low'], b['high']) == pytest.approx((max(lo, 0.0), min(hi, 100.0)), abs=1e-9), (c, n)
        ci = st.binomtest(c, n).proportion_ci(0.95, method='wilson')
        assert (b['low'], b['high']) == pytest.approx((100 * ci.low, 100 * ci.high), abs=1e-9), (c, n)
        assert b['acc'] == 100 * c / n and b['n'] == n and b['correct'] == c and b['interval'] == 'Wilson score'
        assert 0.0 <= b['low'] <= b['acc'] <= b['high'] <= 100.0
    # 15/100 worked out: p = .15, z² = 3.8415: centre .16295, half .06989
    assert (binomial_ci(15, 100)['low'], binomial_ci(15, 100)['high']) == pytest.approx((9.306, 23.284), abs=1e-3)
    # other levels use the matching normal quantile
    lo90, hi90 = wilson(15, 100, z=st.norm.ppf(0.95))
    assert (binomial_ci(15, 100, conf=0.9)['low'], binomial_ci(15, 100, conf=0.9)['high']) == pytest.approx((lo90, hi90), abs=1e-9)
    assert accuracy_ci(15.0, 100) == binomial_ci(15, 100) and accuracy_ci(100 * 7 / 9, 9)['correct'] == 7
    with pytest.raises(ValueError, match='whole number'): accuracy_ci(12.34, 100)
    with pytest.raises(ValueError, match='between 0 and n'): binomial_ci(11, 10)
    with pytest.raises(ValueError, match='at least 1'): binomial_ci(0, 0)
    with pytest.raises(TypeError, match='whole number'): binomial_ci(1.5, 10)


def test_effect_within_noise_definition():
    # noise = the largest Wilson half-width among the accuracies
    hw = lambda a, n: (lambda lo, hi: (hi - lo) / 2)(*wilson(round(a * n / 100), n))
    assert eval_noise([15.0, 16.0], 100) == pytest.approx(max(hw(15.0, 100), hw(16.0, 100)), abs=1e-9)
    assert eval_noise([15.0, 50.0], [100, 10_000]) == pytest.approx(hw(15.0, 100), abs=1e-9)
    assert effect_within_noise(1.5, [15.0, 16.0], 100) is True           # ±7 points of noise
    assert effect_within_noise(-1.5, [15.0, 16.5], 10_000) is False      # ±0.7 points of noise
    assert effect_within_noise(hw(50.0, 400) - 1e-6, [50.0], 400) is True and effect_within_noise(hw(50.0, 400) + 1e-6, [50.0], 400) is False
    with pytest.raises(ValueError, match='image counts'): eval_noise([15.0, 16.0], [100])


def test_aggregate_noise_warning_inside_and_outside():
    # ARD: +5 PGD-20 points on every seed (noise on 10,000 images: ±1 point) -> no warning; +1 AA point on 100 images -> warning
    table = [('ard', False, s, 80.0, 40.0 + s, 30.0 + s) for s in range(3)] + \
            [('ard', True, s, 80.5, 45.0 + s, 31.0 + s) for s in range(3)]
    agg = aggregate_compare(rows_of(table, n=10_000, n_aa=100), metrics=('clean', 'pgd20', 'aa'))
    d = agg['differences'][0]['metrics']
    assert d['pgd20']['mean'] == pytest.approx(5.0) and d['pgd20']['within_noise'] is False
    assert d['pgd20']['noise'] == pytest.approx(max((lambda lo, hi: (hi - lo) / 2)(*wilson(round(a * 100), 10_000))
                                                    for a in (40, 41, 42, 45, 46, 47)), abs=1e-9)
    assert d['aa']['within_noise'] is True and d['aa']['n_images'] == [100] and d['clean']['within_noise'] is True
    assert not any('PGD-20' in w for w in agg['warnings'])
    assert any(w.startswith('ARD AA: the IGDM effect (+1.00 points, mean of 3 seeds) is inside') for w in agg['warnings'])
    md = compare_markdown(agg)
    assert 'ARD AA' in md and '| ARD | PGD-20 | +5.00 | [+5.00, +5.00] | 3 | 3/0/0 |' in md
    # unknown image counts: no noise check, no warning, said as '–'
    rows = [{k: v for k, v in r.items() if k not in ('n', 'n_aa')} for r in rows_of(table)]
    agg = aggregate_compare(rows, metrics=('pgd20', 'aa'))
    assert agg['differences'][0]['metrics']['aa']['within_noise'] is None and not agg['warnings']


def test_aggregate_against_hand_computation():
    table = [('ard', False, 0, 80.1, 40.2, 30.0), ('ard', True, 0, 80.5, 44.1, 31.0),
             ('ard', False, 1, 78.2, 38.0, 28.0), ('ard', True, 1, 79.0, 42.6, 30.0),
             ('ard', False, 2, 79.0, 39.1, 29.0), ('ard', True, 2, 79.9, 41.0, 28.0),
             ('adaad', True, 0, 81.3, 41.2, 33.0), ('adaad', False, 0, 81.0, 41.0, 33.0)]
    agg = aggregate_compare(rows_of(table))
    assert agg['seeds'] == [0, 1, 2] and agg['n_seeds'] == 3
    assert [(v['method'], v['igdm']) for v in agg['variants']] == [('ard', False), ('ard', True), ('adaad', False), ('adaad', True)]
    ard_i = agg['variants'][1]['metrics']['pgd20']
    vals = [44.1, 42.6, 41.0]
    assert ard_i['values'] == vals and ard_i['seeds'] == [0, 1, 2]
    sd = math.sqrt(sum((v - sum(vals) / 3) ** 2 for v in vals) / 2)
    assert ard_i['half_width'] == pytest.approx(st.t.ppf(0.975, 2) * sd / math.sqrt(3), abs=1e-10)
    assert [b['low'] for b in ard_i['binomial']] == pytest.approx([wilson(round(v * 10), 1000)[0] for v in vals], abs=1e-9)
    assert agg['variants'][0]['metrics']['aa']['binomial'][0]['n'] == 100
    d = agg['differences'][0]['metrics']['pgd20']
    assert d['diffs'] == pytest.approx([3.9, 4.6, 1.9]) and (d['positive'], d['negative']) == (3, 0)
    aa = agg['differences'][0]['metrics']['aa']
    assert (aa['positive'], aa['negative'], aa['zero'], aa['agree']) == (2, 1, 0, 2)
    # AdaAD has one seed: its difference has no interval
    ad = agg['differences'][1]
    assert ad['seeds'] == [0] and ad['metrics']['pgd20']['low'] is None and ad['metrics']['pgd20']['mean'] == pytest.approx(0.2)
    # keep only some seeds
    two = aggregate_compare(rows_of(table), seeds=[0, 1])
    assert two['seeds'] == [0, 1] and two['variants'][1]['metrics']['pgd20']['values'] == [44.1, 42.6]
    with pytest.raises(ValueError, match='seed 7'): aggregate_compare(rows_of(table), seeds=[0, 7])


def test_aggregate_one_seed():
    agg = aggregate_compare(rows_of([('ard', False, 3, 80.0, 40.0, 30.0), ('ard', True, 3, 81.0, 42.0, 31.0)]))
    assert agg['seeds'] == [3] and agg['n_seeds'] == 1
    m = agg['variants'][0]['metrics']['pgd20']
    assert m['mean'] == 40.0 and m['std'] is None and m['half_width'] is None and 'no interval' in m['note']
    d = agg['differences'][0]['metrics']['pgd20']
    assert d['diffs'] == [2.0] and d['low'] is None and d['excludes_zero'] is None
    assert any('One seed' in n and 'no interval' in n for n in agg['notes'])
    md = compare_markdown(agg)
    assert 'One seed' in md and '| ARD | 80.00 | 40.00 | 30.00 |' in md.replace(' 0.1000 | 0.5000 | 3.0 | 1 |', '')
    assert '±' not in md.split('IGDM − base')[0]


def test_aggregate_bad_rows_and_missing_variant():
    good = rows_of([('ard', False, 0, 80.0, 40.0, 30.0), ('ard', True, 0, 81.0, 42.0, 31.0), ('ard', True, 1, 81.0, 42.0, 31.0)])
    agg = aggregate_compare(good)
    assert any('seed 1 is left out' in w for w in agg['warnings']) and agg['differences'][0]['seeds'] == [0]
    with pytest.raises(ValueError, match="'seed'"): aggregate_compare([dict(method='ard', igdm=False, pgd20=1.0)])
    with pytest.raises(ValueError, match='Two rows'): aggregate_compare(good + good[:1])
    with pytest.raises(ValueError, match='non-empty list'): aggregate_compare([])
    # AutoAttack skipped (None): the metric is absent, not an error
    skip = [dict(r, aa=None) for r in good]
    agg = aggregate_compare(skip)
    assert agg['variants'][0]['metrics']['aa'] is None and agg['differences'][0]['metrics']['aa'] is None
    assert '| AA |' not in compare_markdown(agg)


def test_aggregate_is_json_serializable():
    table = [('ard', ig, s, 80.0 + s + ig, 40.0 + 2 * s + 3 * ig, 30.0 + s) for s in range(2) for ig in (False, True)]
    agg = aggregate_compare(rows_of(table))
    text = json.dumps(agg, allow_nan=False)
    assert json.loads(text) == agg
    one = aggregate_compare(rows_of(table[:2]))
    assert json.loads(json.dumps(one, allow_nan=False)) == one


def test_plot_seeds_writes_png(tmp_path):
    table = [('ard', ig, s, 80.0 + s, 40.0 + s + ig, 30.0 + s) for s in range(3) for ig in (False, True)] + \
            [('rslad', ig, s, 79.0 + s, 41.0 + s, 31.0) for s in range(3) for ig in (False, True)]
    rows = rows_of(table)
    p = plot_seeds(aggregate_compare(rows), tmp_path/'seeds.png')
    assert p == tmp_path/'seeds.png' and p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    q = plot_seeds(rows[:2], tmp_path/'sub'/'one_seed.png', metrics=('pgd20',))   # rows, one seed, a new folder
    assert q.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert not list(tmp_path.rglob('*.tmp'))
    with pytest.raises(ValueError, match='None of the metrics'): plot_seeds(rows, tmp_path/'x.png', metrics=('cw',))
    assert not (tmp_path/'x.png').exists()


def test_is_accuracy():
    assert all(is_accuracy(k) for k in ('clean', 'fgsm', 'pgd20', 'pgd', 'cw', 'cw50', 'aa', 'any'))
    assert not any(is_accuracy(k) for k in ('gd', 'gc', 'seconds_per_epoch', 'n', 'aax'))
