"""RunDir: the one accessor for a run directory's paths and formats.

A run directory holds one folder per step (run_dir/<step>/), written only by that step. Every other
module asks RunDir for what it reads: the tokenizer, the packed tokens (pack/meta.json is parsed
here), another step's files, and models: `model(which)` with which = "latest" | "best" | a step name |
a model directory, resolved through LINEAGE, the one table of the steps that write a model.
A run may start from a base model instead of pretraining (the recipe's base_model, recorded in
pipeline.json): it is model("base"), "latest" until a step trains another, and its tokenizer is the
run's. `tokens(split, model_dir)` gives the packed text in the tokens of whichever model reads it.

RunDir also remembers every file it handed out (`reads`): the pipeline stores their content
fingerprints in the step's manifest, so a step is redone when what it read changed (resume by
content, not by configuration alone). Loading a model directory's format stays in quark.model.io.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

from quark.io import atomic_write_json, sha256_file

# Steps that write a model directory, in life-cycle order: (step, model folders under run_dir/<step>/
# tried in order, trained). "latest" is the last trained one present; distill and quantize make smaller
# copies of a trained model and are picked only by name.
LINEAGE = (
    ("pretrain", ("final",), True),
    ("domain", ("final",), True),
    ("sft", ("final",), True),
    ("dpo", ("final",), True),
    ("rl", ("final",), True),
    ("distill", ("student",), False),
    ("quantize", ("int4", "int4-gptq", "int4-awq", "int8", "w8a8"), False),
)
LINEAGE_STEPS = tuple(step for step, _, _ in LINEAGE)
MANIFEST = "manifest.json"
_SKIP_SUFFIXES = ("-wal", "-shm", "-journal", ".tmp")   # SQLite side files and half-written temp files


def is_model_dir(path):
    path = Path(path)
    return (path / "config.json").exists() and any(
        (path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json", "quant.json"))


@dataclass
class Pack:
    """The pack step's output: pack/meta.json parsed once, and its token files."""
    dir: Path
    meta: dict

    @property
    def dtype(self):
        return self.meta["dtype"]

    @property
    def vocab_size(self):
        return int(self.meta["vocab_size"])

    def bin(self, split):
        return self.dir / f"{split}.bin"

    def tokens(self, split):
        """The split's tokens as a read-only np.memmap of the packed dtype."""
        import numpy as np
        path = self.bin(split)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the pack step first")
        return np.memmap(path, dtype=np.dtype(self.dtype), mode="r")


class RunDir:
    def __init__(self, root):
        self.root = Path(root)
        self.reads = set()      # files and folders handed out to the step that runs now
        self._pack = None

    @classmethod
    def of(cls, run_dir):
        """A RunDir for run_dir (kept as is when it already is one, so the pipeline sees the reads)."""
        return run_dir if isinstance(run_dir, RunDir) else cls(run_dir)

    @classmethod
    def locate(cls, path):
        """A run directory or a model directory -> (RunDir or None, model directory): a run serves its
        latest model; a model directory inside a run (run/<step>/<name>) keeps its run for the tokenizer."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory (expected a run directory or a model directory)")
        if (path / "config.json").exists():
            run = cls(path.parent.parent)
            return (run if run.has("tokenizer", "tokenizer.json") or run.base_model() is not None else None), path
        run = cls(path)
        return run, run.model("latest")

    def _read(self, path):
        self.reads.add(Path(path))
        return Path(path)

    # -- step folders
    def output(self, step):
        """run_dir/<step>/, created: where that step writes (and only it)."""
        d = self.root / step
        d.mkdir(parents=True, exist_ok=True)
        return d

    def has(self, step, name=None):
        """Whether run_dir/<step>[/<name>] exists (for outputs a step may use when present)."""
        return (self.root / step / name if name else self.root / step).exists()

    def input(self, step, name=None):
        """run_dir/<step>[/<name>], another step's output; FileNotFoundError names the step to run."""
        path = self.root / step / name if name else self.root / step
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the {step} step first")
        return self._read(path)

    def path(self, setting):
        """A file or folder a step's setting names: absolute, or relative to the run directory
        (e.g. sft's data "instruct", rl's prompts "instruct/train.jsonl")."""
        path = Path(setting)
        return self._read(path if path.is_absolute() else self.root / path)

    def shards(self, step, prefix):
        """The JSONL shards run_dir/<step>/<prefix>-NNNNN.jsonl (crawl pages, scrape files); may be empty."""
        paths = sorted((self.root / step).glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9].jsonl"))
        for p in paths:
            self._read(p)
        return paths

    def json(self, step, name):
        path = self.input(step, name)
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None

    # -- tokenizer and tokens
    def tokenizer_path(self, model_dir=None):
        """The tokenizer saved beside model_dir, else the run's: the base model's when the run starts from
        one, else the tokenizer step output."""
        if model_dir is not None and (Path(model_dir) / "tokenizer.json").exists():
            return self._read(Path(model_dir) / "tokenizer.json")
        base = self.base_model()
        if base is not None:
            if not (base / "tokenizer.json").exists():
                raise FileNotFoundError(f"base model {base} has no tokenizer.json")
            return self._read(base / "tokenizer.json")
        path = self.root / "tokenizer" / "tokenizer.json"
        if not path.exists():
            beside = f" beside {model_dir} or" if model_dir is not None else ""
            raise FileNotFoundError(f"no tokenizer.json{beside} in {self.root / 'tokenizer'}: run the tokenizer step first")
        return self._read(path)

    def tokenizer(self, model_dir=None, chat=False):
        """The tokenizer of tokenizer_path; chat=True checks it has Quark's chat special tokens (unless
        a Hugging Face checkpoint's own chat template sits beside it)."""
        from tokenizers import Tokenizer

        from quark.chat import QuarkChat, chat_format, special_ids
        path = self.tokenizer_path(model_dir)
        tok = Tokenizer.from_file(str(path))
        if chat and isinstance(chat_format(tok, path.parent), QuarkChat):
            special_ids(tok)    # fails early, naming the missing chat tokens
        return tok

    def chat(self, model_dir=None):
        """The chat format (quark.chat) of model_dir's tokenizer: a Hugging Face checkpoint's own
        template and eos ids (models fine-tuned from one keep its files), else Quark's template."""
        from quark.chat import chat_format
        path = self.tokenizer_path(model_dir)
        return chat_format(self.tokenizer(model_dir, chat=True), path.parent)

    def pack(self):
        if self._pack is None:
            meta = self.json("pack", "meta.json")
            for key in ("dtype", "vocab_size"):
                if key not in meta:
                    raise ValueError(f"{self.root / 'pack' / 'meta.json'} lacks {key!r}: rerun the pack step")
            self._pack = Pack(self.root / "pack", meta)
        for split in ("train", "val"):
            if self._pack.bin(split).exists():
                self._read(self._pack.bin(split))
        return self._pack

    def tokens(self, split, model_dir=None, max_tokens=None):
        """The split's packed text (its first max_tokens) as int64 tokens of model_dir's tokenizer: the
        pack itself when the model reads the run's tokenizer; else (e.g. an HF model with its own
        vocabulary) the pack's documents decoded with the run's tokenizer and encoded with the model's,
        each followed by the model's eos, so every model is scored on the same text."""
        import numpy as np
        pack = self.pack()
        packed = pack.tokens(split)
        if model_dir is None or not self.has("tokenizer", "tokenizer.json") and self.base_model() is None \
                or self.same_tokenizer(model_dir):   # (without the run's tokenizer the pack cannot be decoded)
            return np.asarray(packed[:max_tokens], dtype=np.int64)
        starts = np.fromfile(self._read(pack.dir / f"{split}.idx"), dtype=np.uint64).astype(np.int64)
        ends = np.append(starts[1:], len(packed))
        if max_tokens is not None:   # whole documents covering max_tokens packed tokens (about as many re-encoded)
            keep = int(np.searchsorted(starts, max_tokens, side="left"))
            starts, ends = starts[:max(keep, 1)], ends[:max(keep, 1)]
        docs = [packed[a:b - 1].tolist() for a, b in zip(starts, ends)]     # each without its trailing eos
        texts = self.tokenizer().decode_batch(docs, skip_special_tokens=False)
        chat = self.chat(model_dir)
        if chat.eos_id is None:
            raise ValueError(f"the tokenizer of {model_dir} has no eos token to separate documents")
        encoded = chat.tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = [i for enc in encoded for i in enc.ids + [chat.eos_id]]
        return np.asarray(ids[:max_tokens], dtype=np.int64)

    def same_tokenizer(self, model_dir, other=None):
        """Whether model_dir reads the same tokenizer as `other` (a model directory; None: the run)."""
        mine, theirs = self.tokenizer_path(model_dir), self.tokenizer_path(other)
        return mine.resolve() == theirs.resolve() or sha256_file(mine) == sha256_file(theirs)

    # -- models
    def base_model(self):
        """The model directory the run starts from instead of pretraining (the recipe's base_model), or None."""
        base = self.state().get("recipe", {}).get("base_model")
        if base and not is_model_dir(base):
            raise FileNotFoundError(f"the run's base_model {base} is not a model directory (moved or deleted?)")
        return Path(base) if base else None

    def step_model(self, step):
        """The model directory step wrote, or None."""
        for step_name, names, _ in LINEAGE:
            if step_name == step:
                return next((self.root / step / n for n in names if is_model_dir(self.root / step / n)), None)
        raise ValueError(f"step {step!r} writes no model; model steps: {', '.join(LINEAGE_STEPS)}")

    def trained_models(self, before=None):
        """[(step, directory)] of the trained models present, in life-cycle order (only the steps
        before step `before` when given); a run's base model comes first, as "base"."""
        base = self.base_model()
        out = [("base", base)] if base is not None else []
        for step, _, trained in LINEAGE:
            if step == before:
                break
            d = self.step_model(step)
            if trained and d is not None:
                out.append((step, d))
        return out

    def model(self, which="latest", before=None, held_out_loss=None):
        """The model directory for `which`; see choose_model."""
        return self.choose_model(which, before, held_out_loss)[0]

    def choose_model(self, which="latest", before=None, held_out_loss=None):
        """(model directory, {candidate: held-out loss}) for which =
        "latest": the last trained model of LINEAGE (the most aligned), before step `before` if given,
                else the run's base model;
        "best": of those, the lowest held_out_loss(model, directory) (alignment trades held-out
                perplexity for behaviour, so the steps that judge a model by perplexity ask for this);
        "base": the run's base model; a step name of LINEAGE; or a model directory (absolute, or
        relative to the run directory)."""
        if which in ("latest", "best", "auto"):
            found = self.trained_models(before)
            if not found:
                steps = LINEAGE_STEPS[:LINEAGE_STEPS.index(before)] if before in LINEAGE_STEPS else LINEAGE_STEPS
                looked = ", ".join(f"{s}/{names[0]}" for s, names, trained in LINEAGE if trained and s in steps)
                raise FileNotFoundError(f"{self.root} holds no trained model (looked for {looked}); run the earlier "
                                        "steps first, name a model directory, or start the recipe from a base_model")
            if which != "best":
                return self._read(found[-1][1]), {}
            if held_out_loss is None:
                raise ValueError("model 'best' needs a held-out loss to compare the candidates")
            from quark.model.io import load_model
            losses = {str(d): round(float(held_out_loss(load_model(d), d)), 4) for _, d in found}
            best = Path(min(losses, key=losses.get))
            for _, d in found:
                self._read(d)
            return best, losses
        if which == "base":
            base = self.base_model()
            if base is None:
                raise FileNotFoundError(f"{self.root} has no base model: its recipe names no base_model")
            return self._read(base), {}
        if which in LINEAGE_STEPS:
            d = self.step_model(which)
            if d is None:
                raise FileNotFoundError(f"{self.root / which} holds no model: run the {which} step first")
            return self._read(d), {}
        path = Path(which)
        if not path.is_absolute() and not path.exists():
            path = self.root / path
        if not is_model_dir(path):
            raise FileNotFoundError(f"model directory {path} does not exist (no config.json with model weights)")
        return self._read(path), {}

    # -- bookkeeping of the pipeline
    @property
    def state_path(self):
        return self.root / "pipeline.json"

    def state(self):
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {"steps": {}}

    @property
    def registry_path(self):
        """The model registry the promote step writes and `quark registry` reads."""
        return self.root / "promote" / "registry.sqlite"

    def manifest_path(self, step):
        return self.root / step / MANIFEST

    def write_manifest(self, step, config):
        """Record what step ran with: its settings and a content fingerprint of every file it read.
        Written atomically after the step's own outputs, so a manifest means a finished step."""
        manifest = {"step": step, "config": config, "inputs": fingerprints(self.reads, self.root / step)}
        atomic_write_json(self.manifest_path(step), manifest)
        return manifest

    def up_to_date(self, step, config):
        """-> (True, "") when step finished with these settings and every file it read has the same
        content; else (False, why)."""
        path = self.manifest_path(step)
        if not path.exists():
            return False, "not run yet"
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError:
            return False, "unreadable manifest"
        if json.dumps(manifest.get("config"), sort_keys=True, default=str) != json.dumps(config, sort_keys=True, default=str):
            return False, "settings changed"
        for name, old in manifest.get("inputs", {}).items():
            p = self.root / name if not Path(name).is_absolute() else Path(name)
            if not p.exists():
                return False, f"{name} is gone"
            st = p.stat()
            if (st.st_size, st.st_mtime_ns) == (old["size"], old["mtime_ns"]):
                continue        # untouched since it was hashed
            if st.st_size != old["size"] or sha256_file(p) != old["sha256"]:
                return False, f"{name} changed"
        return True, ""


def _files(path, exclude):
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    out = []
    for root, dirs, names in os.walk(path):
        if Path(root).resolve() == exclude:
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / n for n in sorted(names)
                if not n.startswith(".") and n != MANIFEST and not n.endswith(_SKIP_SUFFIXES)]
    return out


def fingerprints(paths, own_dir):
    """{path relative to the run: {size, mtime_ns, sha256}} of every file under paths, skipping the
    step's own folder (its outputs are not its inputs)."""
    own = Path(own_dir).resolve()
    root = own.parent
    out = {}
    for p in sorted(set(paths)):
        for f in _files(p, own):
            if own in f.resolve().parents:
                continue
            st = f.stat()
            try:
                name = str(f.resolve().relative_to(root.resolve()))
            except ValueError:
                name = str(f.resolve())
            out[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(f)}
    return out
