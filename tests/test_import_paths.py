"""Issue #27 split `igdmfast.evaluate`, `runs`, `data` and `models` into modules of one concern each. For one release every
public name keeps working from its old module: `from igdmfast.evaluate import grad_alignment` still gives
`igdmfast.alignment.grad_alignment`. Each name below is what the old module's `__all__` held before the split."""
import importlib
import pytest

OLD = {
    'igdmfast.evaluate': ['CW_STEPS', 'EPS_GRID', 'PAPER_COLUMNS', 'COMPARE_COLUMNS', 'check_input_size', 'checkpoint_input_size',
                          'EvalBatches', 'eval_batches', 'EvalAttack', 'parse_attack', 'RobustResult', 'EvaluationWarning',
                          'masking_warnings', 'curve_warnings', 'robust_eval', 'AccVsEps', 'accuracy_vs_eps', 'input_gradients',
                          'grad_alignment', 'taylor_remainder', 'pointwise_distance', 'RobustAccuracy', 'GradCosine', 'GradDistance',
                          'markdown_table', 'save_report', 'paper_table', 'plot_acc_vs_eps', 'plot_grad_cosines', 'plot_panels',
                          'plot_training_curves', 'curve_radii', 'paper_eval', 'compare_table', 'save_compare'],
    'igdmfast.runs': ['MAX_SEED', 'TEACHER_FILES', 'COMMAND_FILES', 'VARIANT_FILES', 'RUN_FILES', 'SAVED_WORK', 'LOCK_FILE',
                      'MANIFEST_FILE', 'SAME_ON_RESUME', 'CACHED_EVAL', 'CLIError', 'n_processes', 'is_main', 'parse_device',
                      'check_numbers', 'parse_threat', 'parse_schedule', 'parse_precision', 'check_seed', 'parse_seeds',
                      'check_model_name', 'check_inner_arg', 'check_igdm_bn_arg', 'run_versions', 'cpu_threads', 'aa_note',
                      'write_json', 'run_config', 'run_files', 'lock_holder', 'RunFolder', 'robustbench_datasets', 'teacher_files',
                      'load_model_arg', 'load_teacher_arg', 'EpochLines', 'fit_epochs', 'learner_kwargs', 'build_model',
                      'train_teacher', 'distill_student', 'check_training', 'check_models', 'probe_model', 'probe_models',
                      'file_sha256', 'run_dls', 'run_settings', 'run_notes', 'variant_dir', 'measured'],
    'igdmfast.data': ['DATASETS', 'IMG_EXTS', 'TINY_IMAGENET_URL', 'crop_flip_params', 'crop_flip', 'random_crop_flip', 'default_augment',
                      'TensorImageDataset', 'TensorImageLoader', 'LabelTypeError', 'tensor_dls', 'synth_dls', 'stratified_subset',
                      'save_npz', 'load_npz', 'load_images', 'folder_to_arrays', 'tiny_imagenet_to_arrays', 'torchvision_to_arrays',
                      'get_data_dir', 'download_dataset', 'dataset_path', 'get_arrays', 'get_dls'],
    'igdmfast.models': ['MBV2_CIFAR_CFG', 'DM_CIFAR10_MEAN', 'DM_CIFAR10_STD', 'DM_CIFAR100_MEAN', 'DM_CIFAR100_STD', 'CIFAR_ARCHS',
                        'ROBUSTBENCH_TEACHERS', 'n_params', 'CifarNet', 'BasicBlock', 'CifarResNet', 'resnet18_cifar', 'tiny_resnet_cifar',
                        'SmallCNN', 'small_cnn', 'PreActBlock', 'PreActResNet', 'preactresnet18', 'InvertedResidual', 'CifarMobileNetV2',
                        'mobilenetv2_cifar', 'tiny_mobilenet_cifar', 'WideBasic', 'NetworkBlock', 'WideResNet', 'wrn34_10', 'wrn34_20',
                        'wrn28_10', 'DMBlock', 'DMBlockGroup', 'DMWideResNet', 'dm_wrn28_10', 'cifar_stem', 'save_weights',
                        'CheckpointError', 'UnsafeCheckpointError', 'read_checkpoint', 'load_teacher', 'robustbench_path'],
    'igdmfast.attacks': ['upcast_half', 'kl_div'],   # moved below attacks and losses, to igdmfast.core
}
OLD['igdmfast.cli'] = OLD['igdmfast.runs']   # `from .runs import *` re-exported all of them from the command line's module
IN_ALL = {'igdmfast.evaluate', 'igdmfast.data', 'igdmfast.models', 'igdmfast.attacks'}   # the old modules that `igdmfast.all` exported (the command line's modules never were)

CASES = [(m, n) for m, names in OLD.items() for n in names]

@pytest.mark.parametrize('module,name', CASES, ids=[f'{m}.{n}' for m, n in CASES])
def test_old_import_path(module, name):
    "`from <old module> import <name>` works and gives the object of its new home (also exported by `igdmfast.all`)."
    obj = getattr(importlib.import_module(module), name)
    if module in IN_ALL: assert getattr(importlib.import_module('igdmfast.all'), name) is obj
    home = getattr(obj, '__module__', None)
    if home and home.startswith('igdmfast.'): assert getattr(importlib.import_module(home), name) is obj

def test_from_import_statement():
    "The `from ... import ...` statement itself (not only `getattr`)."
    ns = {}
    exec('from igdmfast.evaluate import grad_alignment, save_report, plot_panels, robust_eval', ns)
    from igdmfast.alignment import grad_alignment
    from igdmfast.plots import plot_panels
    from igdmfast.report import save_report
    assert (ns['grad_alignment'], ns['save_report'], ns['plot_panels']) == (grad_alignment, save_report, plot_panels)
    exec('from igdmfast.runs import RunFolder, CLIError, run_dls', ns)
    from igdmfast.options import CLIError
    from igdmfast.runfolder import RunFolder
    assert (ns['RunFolder'], ns['CLIError']) == (RunFolder, CLIError)

def test_private_names_other_modules_use():
    "`igdmfast.export` reads `_describe` and `_cfg` from `igdmfast.models`."
    from igdmfast.models import _describe, _cfg
    from igdmfast.weights import _describe as d
    assert _describe is d and callable(_cfg)

def test_unknown_name_still_fails():
    for m in OLD:
        with pytest.raises(ImportError): exec(f'from {m} import no_such_name', {})
