"""
Poor man's configurator, the nanoGPT way. A script sets its defaults as module-level variables, then execs this file,
which overrides them left to right: python train.py config/train_cifar.py --batch_size=64 --compile=False

A config file is plain Python. --key=value is a Python literal (--lr=1e-3, --compile=False, --classes=3,5), kept as text
where the default is a string (--device=cuda). An unknown key, a wrongly typed value or a missing file ends the program
with one line; --help lists the keys (`config_keys`: module-level values of a config type, except _private and UPPER
names). A script that reads another's config files sets _config_files_may_set_other_keys = True.
"""

import ast as _ast
import builtins as _builtins
import difflib as _difflib
import sys as _sys

_CONFIG_TYPES = (bool, int, float, str, tuple, list, type(None))
config_keys = [_k for _k, _v in globals().items()
               if not _k.startswith("_") and not _k.isupper() and isinstance(_v, _CONFIG_TYPES)]

def _checked_value(key, value, source):
    """value, converted to the type of key's default where that is lossless, or an error."""
    if key not in config_keys:
        close = _difflib.get_close_matches(key, config_keys, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; run with --help to list them"
        _sys.exit(f"config error: unknown config key '{key}' ({source}){hint}")
    default = globals()[key]
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)  # --lr=1 means 1.0
    if isinstance(default, (tuple, list)):
        if type(value) in (int, float, str):
            value = (value,)  # --classes=3 for a tuple key
        if isinstance(value, (tuple, list)):
            return type(default)(value)
    _sys.exit(f"config error: {key} ({source}) expects {type(default).__name__} like {default!r}, "
              f"got {type(value).__name__} {value!r}")

def _parse_value(key, text):
    """A Python literal; for a string key the text as typed unless quoted (--name="'x'"); a bare word stays text."""
    try:
        value = _ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return text if key in config_keys and isinstance(globals()[key], str) and not isinstance(value, str) else value

for _arg in _sys.argv[1:]:
    if _arg in ("-h", "--help"):
        print(f"usage: python {_sys.argv[0]} [config_file.py ...] [--key=value ...]\n\nconfig keys and defaults:")
        print("\n".join(f"  --{_k}={globals()[_k]!r}" for _k in config_keys))
        _sys.exit(0)
    elif _arg.startswith("--"):
        if "=" not in _arg:
            _sys.exit(f"config error: '{_arg}' has no value; write {_arg}=VALUE")
        _key, _text = _arg[2:].split("=", 1)
        _value = _checked_value(_key, _parse_value(_key, _text), "command line")
        print(f"Overriding: {_key} = {_value!r}")
        globals()[_key] = _value
    else:
        try:
            with open(_arg) as _f:
                _source = _f.read()
        except OSError as _e:
            _sys.exit(f"config error: cannot read config file '{_arg}': {_e.strerror}")
        print(f"Overriding config with {_arg}")
        _namespace = {}  # run in its own namespace, then every name it set checked like a --key=value
        try:
            exec(_builtins.compile(_source, _arg, "exec"), _namespace)  # builtins': a config key is named compile
        except Exception as _e:
            _sys.exit(f"config error: config file '{_arg}' failed: {type(_e).__name__}: {_e}")
        for _key, _value in _namespace.items():
            if not _key.startswith("_") and isinstance(_value, _CONFIG_TYPES):
                if _key not in config_keys and globals().get("_config_files_may_set_other_keys"):
                    continue  # e.g. bench.py reading a train config: keys only train.py uses
                globals()[_key] = _checked_value(_key, _value, _arg)
