"""The defences of the online learner (SPEC "Baselines", "DSC"): ``defenders`` holds ST, AT, DSC and the
registry ``DEFENDERS`` (a new defence is one class registered there); ``dsc`` holds DSC's mathematics;
``config`` their settings. The learner itself (model, optimizer, SGD step) is in ``utils.core.train``."""
