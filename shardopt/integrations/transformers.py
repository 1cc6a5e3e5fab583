"""Hugging Face ``transformers.Trainer`` with shardopt optimizers: sharded state in Trainer's own checkpoints.

    from shardopt.integrations.transformers import ShardoptTrainer
    args = TrainingArguments(output_dir="out", optim="shardopt_lion", optim_args="betas=0.9,0.99",
                             learning_rate=1e-4, weight_decay=0.1, save_steps=500)
    trainer = ShardoptTrainer(model=model, args=args, train_dataset=ds)
    trainer.train()                                     # later: trainer.train(resume_from_checkpoint=True)

What it changes, and where (the narrowest Trainer methods):

* **Checkpoints.** ``_save_optimizer_and_scheduler`` writes a shardopt
  optimizer through :func:`shardopt.checkpoint.save` into
  ``checkpoint-N/shardopt_optimizer/`` (collective: every rank writes its own
  part, DCP), instead of rank 0's ``optimizer.pt``; the LR scheduler goes to
  ``scheduler.pt`` as Trainer writes it. ``_load_optimizer_and_scheduler``
  reads it back at the same or another world size and layout. The model
  weights, RNG states and ``trainer_state.json`` stay Trainer's business, so
  they are saved and restored as Trainer does it. Other optimizers, DeepSpeed
  (the engine's own checkpoints) and FSDP (accelerate's DCP path) go through
  Trainer's code unchanged.
* **``optim="shardopt_lion" | "shardopt_adamw" | "shardopt_muon"``.** Importing
  this module adds the three names to transformers' ``OptimizerNames`` enum
  (which ``TrainingArguments`` validates ``optim`` against, and from which
  ``HfArgumentParser`` takes ``--optim`` choices) and their builders to
  Trainer's optimizer handler table. Lion and AdamW get Trainer's own
  decay/no-decay groups (``get_decay_parameter_names``: no decay for biases
  and norms). Muon gets :func:`shardopt.muon_param_groups`, each group split
  the same way, with the auxiliary group at ``learning_rate``.
* :class:`ShardoptCallback` does the same for a Trainer subclass you cannot
  change (``callbacks=[ShardoptCallback()]``): at ``on_init_end`` it finds the
  Trainer that called it and overrides those methods on that instance only.

A plain ``Trainer`` that saves a sharded shardopt optimizer from rank 0 alone
gets one warning at save time (:mod:`._trainer_watch`).
"""
from __future__ import annotations

import contextvars
import os
import re
import sys
import warnings

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings
from transformers.training_args import OptimizerNames
from transformers.utils.import_utils import check_torch_load_is_safe

from .. import checkpoint as _ckpt
from ..optim import AdamW, Lion, Muon, ShardedOptimizer, muon_param_groups
from . import _trainer_watch
from .deepspeed import _DTYPE_KEYS, _DTYPES, MUON_AUX_KEYS, config_keys, entry_for

SHARDOPT_DIR = "shardopt_optimizer"  # inside Trainer's checkpoint-N/
OPTIM_NAMES = {"shardopt_lion": Lion, "shardopt_adamw": AdamW, "shardopt_muon": Muon}
_TUPLE_KEYS = ("betas", "aux_betas", "ns_coefficients")
_LIST_KEYS = ("muon", "aux")
_STRING_KEYS = ("sharding",)  # sharding="none" is a layout, not None
# the param-group rule of the Trainer building the optimizer (a subclass may override get_decay_parameter_names)
_DECAY_NAMES = contextvars.ContextVar("shardopt_decay_parameter_names", default=None)


# ---------------------------------------------------------------------------- optim / optim_args
def _optim_name(args) -> str:
    return str(getattr(args.optim, "value", args.optim))


def _scalar(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def parse_optim_args(text) -> dict:
    """``"betas=0.9,0.99,backend=cpu"`` -> ``{"betas": (0.9, 0.99), "backend": "cpu"}``.

    Trainer's own parser splits at every comma, so a tuple (``betas``,
    ``aux_betas``, ``ns_coefficients``) or a name list (``muon``, ``aux``)
    written with commas needs :class:`ShardoptTrainer`; a plain Trainer takes
    ``beta1=...,beta2=...`` and ``:``-separated lists (``aux=embed:lm_head``).
    """
    raw: dict[str, list] = {}
    last = None
    for piece in (text or "").replace(" ", "").split(","):
        if not piece:
            continue
        if "=" in piece:
            key, value = piece.split("=", 1)
            raw[key] = [value]
            last = key
        elif last is None:
            raise ValueError(f"optim_args {text!r}: expected comma-separated key=value pairs, but it starts with "
                             f"{piece!r}")
        else:
            raw[last].append(piece)
    out = {}
    for key, values in raw.items():
        if key in _LIST_KEYS:
            out[key] = [s for v in values for s in v.split(":") if s]
        elif key in _DTYPE_KEYS:
            name = values[0].lower().removeprefix("torch.")
            if len(values) != 1 or name not in _DTYPES:
                raise ValueError(f"optim_args: invalid {key} {','.join(values)!r}; use one of "
                                 f"{', '.join(sorted(_DTYPES))}")
            out[key] = _DTYPES[name]
        elif key in _STRING_KEYS and len(values) == 1:
            out[key] = values[0]
        elif key in _TUPLE_KEYS or len(values) > 1:
            out[key] = tuple(_scalar(v) for v in values)
        else:
            out[key] = _scalar(values[0])
    return out


def _valid_keys(name: str) -> list[str]:
    entry = entry_for(f"shardopt.{OPTIM_NAMES[name].__name__}")
    drop = {"weight_decay"} if OPTIM_NAMES[name] is Muon else {"weight_decay", "lr"}
    keys = [k for k in config_keys(entry) if k not in drop]
    if OPTIM_NAMES[name] is not Muon:
        keys += ["beta1", "beta2"]
    return keys


def shardopt_optimizer_cls_and_kwargs(args, model=None):
    """(class, kwargs) for ``args.optim`` = ``shardopt_lion`` / ``shardopt_adamw`` / ``shardopt_muon``.

    Lion and AdamW: ``lr=learning_rate``, ``betas=(adam_beta1, adam_beta2)``
    (as Trainer's own Lion and AdamW), AdamW ``eps=adam_epsilon``; Trainer
    builds the decay/no-decay groups. Muon: kwargs carry the ``params`` groups
    (see :func:`trainer_muon_groups`); its matrices' ``lr`` comes from
    ``optim_args`` (default ``learning_rate``). ``optim_args`` sets any other
    constructor keyword.
    """
    name = _optim_name(args)
    cls = OPTIM_NAMES[name]
    given = parse_optim_args(args.optim_args)
    valid = _valid_keys(name)
    if "weight_decay" in given:
        raise ValueError(f"optim_args for {name}: weight_decay comes from TrainingArguments(weight_decay=...), which "
                         "Trainer applies to every parameter but biases and norms; set it there")
    if cls is not Muon and "lr" in given:
        raise ValueError(f"optim_args for {name}: lr comes from TrainingArguments(learning_rate=...); set it there")
    bad = sorted(k for k in given if k not in valid)
    if bad:
        raise ValueError(f"optim_args for {name}: unknown key(s) {', '.join(map(repr, bad))}; "
                         f"valid: {', '.join(valid)}")
    if cls is Muon:
        if model is None:
            raise ValueError("optim='shardopt_muon' needs the model, to split its parameters into Muon and aux groups")
        aux = {k: given.pop(k) for k in MUON_AUX_KEYS if k in given}
        kwargs = {"lr": args.learning_rate, **given}
        kwargs["params"] = trainer_muon_groups(model, args, **aux)
        return Muon, kwargs
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2)}
    if cls is AdamW:
        kwargs["eps"] = args.adam_epsilon
    b1, b2 = given.pop("beta1", None), given.pop("beta2", None)
    if b1 is not None or b2 is not None:
        kwargs["betas"] = (kwargs["betas"][0] if b1 is None else b1, kwargs["betas"][1] if b2 is None else b2)
    kwargs.update(given)
    return cls, kwargs


def _decay_parameter_names(model) -> set:
    fn = _DECAY_NAMES.get()
    if fn is None:  # a plain Trainer's handler call: Trainer's rule, which does not read self
        return set(Trainer.get_decay_parameter_names(None, model))
    return set(fn(model))


def trainer_muon_groups(model, args, *, aux_lr=None, aux_weight_decay=None, **aux) -> list[dict]:
    """:func:`shardopt.muon_param_groups` with Trainer's weight-decay rule.

    Every group is split into the parameters Trainer decays (weight decay
    ``args.weight_decay``; ``aux_weight_decay`` for the aux group if given) and
    those it does not (biases and norms, 0.0). The aux group's lr is
    ``aux_lr`` or ``args.learning_rate``.
    """
    decay = _decay_parameter_names(model)
    groups = muon_param_groups(model, aux_lr=args.learning_rate if aux_lr is None else aux_lr, **aux)
    out = []
    for g in groups:
        wd = args.weight_decay
        if g["algorithm"] != "muon" and aux_weight_decay is not None:
            wd = aux_weight_decay
        for decayed in (True, False):
            keep = [k for k, n in enumerate(g["param_names"]) if (n in decay) == decayed]
            if keep:
                out.append(dict(g, params=[g["params"][k] for k in keep],
                                param_names=[g["param_names"][k] for k in keep], weight_decay=wd if decayed else 0.0))
    return out


def get_optimizer_cls_and_kwargs(args, model=None):
    """Trainer's ``get_optimizer_cls_and_kwargs``, with shardopt's names parsed by :func:`parse_optim_args`."""
    if _optim_name(args) in OPTIM_NAMES:
        return shardopt_optimizer_cls_and_kwargs(args, model)
    return Trainer.get_optimizer_cls_and_kwargs(args, model)


def _handler(ctx):
    return shardopt_optimizer_cls_and_kwargs(ctx.args, ctx.model)


def _add_enum_member(enum_cls, value: str):
    """Add ``value`` to a ``str`` enum, as its own members are: by value, by name, in iteration order."""
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    name = value.upper()
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    return member


def install() -> None:
    """Make ``optim="shardopt_*"`` valid ``TrainingArguments`` and build them in any Trainer. Idempotent."""
    try:  # transformers 5's table of optimizer builders, which Trainer.get_optimizer_cls_and_kwargs reads
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS as handlers
    except ImportError:  # without it only ShardoptTrainer / ShardoptCallback build the shardopt_* names
        handlers = None
    for value in OPTIM_NAMES:
        member = _add_enum_member(OptimizerNames, value)
        if handlers is not None:
            handlers[member] = _handler
    _trainer_watch.install()


# ---------------------------------------------------------------------------- checkpoints
def sharded_optimizer(opt):
    """The shardopt optimizer inside ``opt`` (accelerate's ``AcceleratedOptimizer`` and similar wrappers), or None."""
    for _ in range(4):
        if opt is None or isinstance(opt, ShardedOptimizer):
            break
        opt = getattr(opt, "optimizer", None)
    return opt if isinstance(opt, ShardedOptimizer) else None


def _ours(trainer):
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return None  # the engine's own checkpoints / accelerate's DCP path
    return sharded_optimizer(trainer.optimizer)


def save_optimizer_and_scheduler(trainer, output_dir: str) -> bool:
    """Write the shardopt optimizer (every rank) and the scheduler (as Trainer does); False if not ours."""
    opt = _ours(trainer)
    if opt is None:
        return False
    os.makedirs(output_dir, exist_ok=True)
    _ckpt.save(os.path.join(output_dir, SHARDOPT_DIR), trainer.model, opt, model_weights=False)
    if trainer.args.should_save and trainer.lr_scheduler is not None:
        with warnings.catch_warnings(record=True) as caught:
            torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        reissue_pt_warnings(caught)
    return True


def load_optimizer_and_scheduler(trainer, checkpoint: str) -> bool:
    """Read what :func:`save_optimizer_and_scheduler` wrote, at any world size; False if there is none."""
    opt = _ours(trainer)
    path = os.path.join(checkpoint, SHARDOPT_DIR)
    if opt is None or not (os.path.isdir(path) or os.path.isdir(path + ".old")):
        return False
    _ckpt.load(path, trainer.model, opt, model_weights=False)
    sched = os.path.join(checkpoint, SCHEDULER_NAME)
    if trainer.lr_scheduler is not None and os.path.isfile(sched):
        with warnings.catch_warnings(record=True) as caught:
            check_torch_load_is_safe()
            trainer.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))
        reissue_pt_warnings(caught)
    return True


def _on_every_rank(fn, *args):
    """Run ``fn`` and raise on every rank if it failed on any (a rank that loaded would hang in the first step)."""
    err = None
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - re-raised below
        err = e
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        found: list = [None] * dist.get_world_size()
        dist.all_gather_object(found, None if err is None else f"{type(err).__name__}: {err}")
        if err is None:
            bad = next(((r, m) for r, m in enumerate(found) if m), None)
            if bad is not None:
                raise RuntimeError(f"shardopt: rank {bad[0]} could not load the optimizer and scheduler from the "
                                   f"checkpoint, so no rank resumes: {bad[1]}")
    if err is not None:
        raise err


def _install_deepspeed() -> None:
    from .deepspeed import install as install_deepspeed

    install_deepspeed()


class ShardoptTrainer(Trainer):
    """A ``transformers.Trainer`` whose checkpoints hold a sharded shardopt optimizer whole (see module docstring).

    Drop-in: the constructor is Trainer's. ``save_steps`` checkpoints write the
    optimizer through ``shardopt.checkpoint`` (every rank its part) and
    ``train(resume_from_checkpoint=...)`` restores it at any world size. A
    DeepSpeed config naming ``"shardopt.*"`` optimizers works without
    ``import shardopt.deepspeed``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            _install_deepspeed()

    get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)

    def create_optimizer(self, model=None):
        token = _DECAY_NAMES.set(self.get_decay_parameter_names)
        try:
            return super().create_optimizer(model)
        finally:
            _DECAY_NAMES.reset(token)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not save_optimizer_and_scheduler(self, output_dir):
            super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is None or load_optimizer_and_scheduler(self, checkpoint):
            return
        _on_every_rank(super()._load_optimizer_and_scheduler, checkpoint)


_ATTACHED = "_shardopt_attached"


def attach(trainer) -> None:
    """Give one Trainer instance :class:`ShardoptTrainer`'s checkpoint and optimizer methods (idempotent)."""
    if isinstance(trainer, ShardoptTrainer) or getattr(trainer, _ATTACHED, False):
        return
    cls = type(trainer)

    def _save_optimizer_and_scheduler(output_dir):
        if not save_optimizer_and_scheduler(trainer, output_dir):
            cls._save_optimizer_and_scheduler(trainer, output_dir)

    def _load_optimizer_and_scheduler(checkpoint):
        if checkpoint is None or load_optimizer_and_scheduler(trainer, checkpoint):
            return
        _on_every_rank(cls._load_optimizer_and_scheduler, trainer, checkpoint)

    def create_optimizer(model=None):
        token = _DECAY_NAMES.set(trainer.get_decay_parameter_names)
        try:
            return cls.create_optimizer(trainer, model)
        finally:
            _DECAY_NAMES.reset(token)

    trainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
    trainer._load_optimizer_and_scheduler = _load_optimizer_and_scheduler
    trainer.create_optimizer = create_optimizer
    if cls.get_optimizer_cls_and_kwargs is Trainer.get_optimizer_cls_and_kwargs:  # keep a subclass's own
        trainer.get_optimizer_cls_and_kwargs = get_optimizer_cls_and_kwargs
    setattr(trainer, _ATTACHED, True)
    if trainer.is_deepspeed_enabled:
        _install_deepspeed()


class ShardoptCallback(TrainerCallback):
    """:class:`ShardoptTrainer`'s behaviour for any Trainer subclass: ``callbacks=[ShardoptCallback()]``.

    Callbacks are not handed the Trainer, so at ``on_init_end`` this one takes
    the Trainer instance from the caller's frame (``Trainer.__init__``) and
    overrides its optimizer-building and checkpoint methods on that instance
    (:func:`attach`); the class is not touched. Pass it to the constructor: one
    added later with ``add_callback`` attaches at ``on_train_begin``, in time
    for the checkpoints this run saves but after a resume has loaded the
    optimizer.
    """

    def on_init_end(self, args, state, control, **kwargs):
        trainer = _trainer_watch.calling_trainer(sys._getframe(1))
        if trainer is None:
            raise RuntimeError("ShardoptCallback: no transformers.Trainer found among its callers; pass it to a "
                               "Trainer's constructor (callbacks=[ShardoptCallback()]) or use ShardoptTrainer")
        attach(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        # added with add_callback after the Trainer was built: from now on, checkpoints hold the sharded state
        trainer = _trainer_watch.calling_trainer(sys._getframe(1))
        if trainer is not None:
            attach(trainer)


install()

__all__ = [
    "ShardoptTrainer", "ShardoptCallback", "attach", "install", "parse_optim_args", "shardopt_optimizer_cls_and_kwargs",
    "trainer_muon_groups", "get_optimizer_cls_and_kwargs", "save_optimizer_and_scheduler",
    "load_optimizer_and_scheduler", "sharded_optimizer", "OPTIM_NAMES", "SHARDOPT_DIR",
]
