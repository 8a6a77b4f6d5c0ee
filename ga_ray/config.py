"""Typed configuration for every stage.

One pydantic model per stage, each field documented by its docstring (pydantic turns the attribute
docstrings into field descriptions, which `ga-ray config --help-fields` prints). Configs load from
YAML, take `--set section.key=value` overrides from the CLI, and are saved into the run directory.
Unknown keys are errors that name the key and list the allowed ones.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ga_ray.errors import ConfigError

PACKAGED_CONFIGS = Path(__file__).parent / "configs"

Share = Annotated[float, Field(ge=0.0, le=1.0)]
"""A fraction between 0 and 1."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class RayConfig(Section):
    address: str | None = None
    """Ray cluster to join (e.g. `auto` or `ray://host:10001`). None starts a local Ray in-process."""
    num_cpus: int | None = None
    """CPUs for a local Ray (None: all of this machine's)."""
    execution_no_progress_timeout_s: float = 600.0
    """Ray Data raises instead of hanging when a pipeline makes no progress for this long."""


class DataConfig(Section):
    path: str | None = None
    """Training documents: a JSONL file, a Parquet file or folder, or a `datasets.save_to_disk` folder."""
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = "auto"
    """Input format; `auto` decides from the path."""
    messages_column: str = "messages"
    """Column holding chat turns as a list of {role, content}."""
    prompt_column: str = "prompt"
    """Column holding the prompt, used when there is no messages column."""
    response_column: str = "response"
    """Column holding the response, used when there is no messages column."""
    id_column: str = "id"
    """Column used as `doc_id` when present (integers); otherwise the row's position in the source."""
    system_prompt: str | None = None
    """System message prepended to prompt/response rows (None: none)."""
    max_length: int = 512
    """Documents longer than this many tokens are truncated (and counted)."""
    skip_bad_rows: bool = False
    """Write bad rows to `data/rejected.jsonl` with their reason and prepare the rest, instead of failing with the list of bad rows."""
    num_blocks: int | None = None
    """Ray Data blocks for tokenisation (None: Ray decides)."""
    split: str | None = None
    """Split to prepare when data.path is a saved `datasets.DatasetDict` (None: its only split, or `train`)."""
    batch_size: int = 256
    """Documents per tokeniser call in the Ray Data tasks (one CPU each)."""


class ModelConfig(Section):
    path: str | None = None
    """Base causal LM: a local folder in transformers format."""
    tokenizer: str | None = None
    """Tokenizer folder (None: the model folder)."""
    adapter: str | None = None
    """PEFT LoRA adapter folder to analyse (None: the run's own `adapter/` from the finetune stage)."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off unless you trust the folder."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: `auto` is bfloat16 on GPU and float32 on CPU."""


class LoraConfig(Section):
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the scale is alpha/r (alpha/sqrt(r) with rsLoRA)."""
    target_modules: list[str] = ["q_proj", "v_proj"]
    """Module names that get LoRA adapters."""
    dropout: float = 0.0
    """LoRA dropout during fine-tuning (always inactive during analysis)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling."""


class FinetuneConfig(Section):
    enabled: bool = True
    """Run the finetune stage. Off when you bring your own adapter (`model.adapter`)."""
    lora: LoraConfig = LoraConfig()
    """The adapter to train."""
    epochs: float = 3.0
    """Passes over the data."""
    learning_rate: float = 2e-3
    """AdamW peak learning rate (linear warm-up, cosine decay)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_fraction: float = 0.05
    """Share of the steps spent warming up."""
    batch_size: int = 32
    """Documents per optimiser step, summed over workers."""
    num_workers: int = 1
    """Ray Train workers (DDP; gloo on CPU, NCCL on GPU)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per Train worker (fractional is fine beside Ray Data on a small machine)."""
    use_gpu: Literal["auto", True, False] = "auto"
    """Train on GPUs: `auto` when CUDA is available."""
    eval_prompts: int = 100
    """Held-out prompts per family / behaviour for the format table at the end (demo world only)."""
    max_new_tokens: int = 96
    """Greedy decoding length for the format table."""
    format_eval_set: str | None = None
    """A demo world's held-out prompt folder; when set, the stage ends with the format table."""
    format_eval_base: bool = True
    """Also score the base model (adapter off) on the same prompts, so the table shows what the fine-tune changed."""
    eval_batch_size: int = 64
    """Prompts per batched greedy generation in the format table (left padding)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm over the LoRA parameters); 0 disables."""
    seed: int = 0
    """Seed of the LoRA initialisation and of the data order."""
    torch_threads: int | None = None
    """Torch intra-op threads per Train worker and for the format table (None: cpus_per_worker rounded up)."""
    storage_path: str | None = None
    """Ray Train storage for the checkpoint hand-off (None: a hidden folder in the run directory, removed after the
    stage). On a multi-node cluster set shared storage (NFS path or s3://...)."""


def _yaml_bool_to_word(v: Any) -> Any:
    """YAML reads `fisher: true` as a boolean; the option is the word."""
    return "true" if v is True else v


class FactorsConfig(Section):
    fisher: Annotated[Literal["true", "empirical"], BeforeValidator(_yaml_bool_to_word)] = "true"
    """`true`: labels sampled from the model at response positions (seeded by doc_id); `empirical`: the data's."""
    eigenvalues: Literal["ekfac", "kfac"] = "ekfac"
    """Rank and scale by the EKFAC-corrected Λ, or by λ_S·λ_A (what the paper's code did)."""
    top_k: int = 50
    """Eigen-pairs (i, j) kept per LoRA block; D = blocks × top_k."""
    epsilon: float = 1e-6
    """Damping added to the eigenvalues before the square root."""
    batch_size: int = 16
    """Documents per forward/backward pass."""
    num_workers: int = 1
    """Ray Train workers; blocks' eigendecompositions are spread over them."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per Train worker."""
    use_gpu: Literal["auto", True, False] = "auto"
    """Use GPUs: `auto` when CUDA is available."""
    lambda_max_docs: int | None = None
    """Estimate Λ on a seeded subsample of this many documents (None: all)."""
    reduction: Literal["sum", "mean"] = "sum"
    """Per-document loss: sum over response tokens (the paper's) or mean."""
    seed: int = 0
    """Seed of the true-Fisher label draws."""
    max_tokens_per_batch: int = 4096
    """Token budget per forward/backward pass (documents × padded length); documents are sorted by
    length within windows of 16 × batch_size, so padding stays small."""
    covariance_dtype: Literal["float32", "float64"] = "float32"
    """dtype of each batch's covariance token sums (accumulated across batches in float64 either way)."""
    save_covariances: bool = True
    """Also store C_A and C_S in factors.safetensors (not needed to project; large for big models)."""
    save_from: Literal["worker", "driver"] = "worker"
    """Who writes factors/: rank 0 worker (run directory on a filesystem every node sees, as the other
    stages need too) or the driver (factors returned through Ray; for clusters without a shared filesystem)."""


class GradientsConfig(Section):
    batch_size: int = 16
    """Maximum documents per forward/backward pass."""
    max_tokens_per_batch: int = 4096
    """Token budget per batch (padded length × documents); batches are length-bucketed."""
    num_actors: int = 1
    """Actors in the Ray Data pool; each holds the model, adapter and factors once."""
    num_gpus: Literal["auto"] | float = "auto"
    """GPUs per actor: `auto` is 1 when CUDA is available, else 0."""
    cpus_per_actor: float = 1.0
    """CPUs per actor."""
    store_raw: bool = False
    """Also write the raw LoRA-space gradient (float16) for small models."""
    reduction: Literal["sum", "mean"] = "sum"
    """Per-document loss: sum over response tokens (the paper's) or mean."""
    window_docs: int = 1024
    """Documents per Ray Data batch handed to an actor; each window is sorted by length and cut into token-budget batches (bigger: less padding, more work redone if an actor dies)."""
    max_retries: int = 3
    """Times Ray restarts a dead actor and retries its window (crash, OOM kill, preemption) before the stage fails."""


class DictionaryConfig(Section):
    backend: Literal["torch", "sklearn"] = "torch"
    """`torch`: our distributed online learner; `sklearn`: the paper's exact MiniBatchDictionaryLearning call."""
    n_atoms: int = 500
    """Dictionary size K."""
    alpha: float = 0.1
    """L1 penalty α of scikit-learn's objective."""
    batch_size: int = 256
    """Rows per online step."""
    max_epochs: float = 20.0
    """Upper bound on passes over the data."""
    tol: float = 1e-3
    """Stop when the held-out objective improves by less than this (relative) over `patience` checks."""
    patience: int = 3
    """Held-out checks without improvement before stopping."""
    heldout_fraction: float = 0.05
    """Share of rows kept aside to measure the objective for stopping."""
    lasso_tol: float = 1e-6
    """Tolerance of the sparse coder (max KKT violation)."""
    lasso_max_iter: int = 500
    """Iterations cap of the sparse coder per batch."""
    init: Literal["data", "svd"] = "data"
    """Initial dictionary: the first K rows of the shuffled stream (`data`), or the top right singular
    vectors of a sample of 2K rows (`svd`, like scikit-learn's start; fewer epochs on some data, but
    it can stall on planted atoms, where `data` recovers more)."""
    num_workers: int = 1
    """Ray actors coding blocks in parallel."""
    use_gpu: Literal["auto", True, False] = "auto"
    """Code on GPU when available."""
    checkpoint_every: int = 20
    """Online steps between checkpoints."""
    seed: int = 42
    """Seed of initialisation, shuffling and resampling."""
    n_seeds: int = 1
    """Fit this many seeds and report atom stability (Hungarian matching)."""
    kmeans_clusters: int | None = 14
    """k-means baseline clusters (dask-ml); None skips the baseline."""
    eval_every: int | None = None
    """Online steps between held-out objective checks (None: once per epoch, at most every 200 steps)."""
    heldout_max_rows: int = 10_000
    """Cap on held-out rows (they are kept in the workers' memory and coded at every check)."""
    shuffle_buffer_mb: float = 512.0
    """Rows shuffled together (a window of row groups), in MB of float32 rows, summed over workers."""
    max_piece_rows: int = 8192
    """Parquet row groups larger than this are read in slices of this many rows."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per coding actor (also its torch threads)."""
    dup_threshold: float | None = 0.99
    """Resample an atom whose |cos| with another exceeds this (None: never)."""
    encode_batch_size: int = 1024
    """Documents per `map_batches` call of the final encoding pass."""
    sklearn_max_iter: int = 100
    """`max_iter` (epochs) of the `sklearn` backend (the paper's 100)."""


class CoherenceConfig(Section):
    top_docs: int = 20
    """Documents per atom used for coherence and shown in the report."""
    batch_size: int = 16
    """Documents per gradient pass."""
    max_tokens_per_batch: int = 4096
    """Token budget per gradient pass (padded length × documents); batches are length-bucketed."""
    num_actors: int = 1
    """Actors recomputing raw gradients."""
    num_gpus: Literal["auto"] | float = "auto"
    """GPUs per actor: `auto` is 1 when CUDA is available, else 0."""
    label_endpoint: str | None = None
    """OpenAI-compatible base URL used to name atoms from their excerpts (None: keywords only)."""
    label_model: str | None = None
    """Model name sent to `label_endpoint`."""
    label_column: str | None = "task"
    """Sidecar label column used only for the discovery score (None or absent: no score)."""
    cpus_per_actor: float = 1.0
    """CPUs per coherence actor."""
    group_memory_mb: float = 1024.0
    """Memory for the per-atom gradient sums of one work item (atoms per item × P × 4 bytes); bounds each actor."""
    dtype: Literal["float32", "model"] = "float32"
    """Weights dtype when recomputing raw gradients: float32 (exact cosines) or the model's `model.dtype`."""
    examples_per_atom: int = 5
    """Top documents per atom kept with prompt/response excerpts in atoms/characterisation.json."""
    excerpt_chars: int = 300
    """Characters kept of each prompt and response excerpt."""
    n_keywords: int = 8
    """Characteristic words per atom (log-odds against the whole data set)."""
    background_docs: int = 20000
    """Responses decoded as the background of the characteristic words (a seeded sample above this)."""
    label_top_atoms: int = 50
    """Most coherent atoms sent to `label_endpoint` for a label."""
    label_timeout_s: float = 30.0
    """Timeout of one label request, in seconds."""
    label_api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (sent as a Bearer token when set)."""


class ReportConfig(Section):
    top_atoms: int = 50
    """Atoms in the report's table."""
    examples_per_atom: int = 2
    """Example documents shown per atom in the table."""
    excerpt_chars: int = 160
    """Characters shown of each example's prompt and response."""


class DetectorSpec(Section):
    """A user-defined behaviour detector: a regex applied by a rule."""

    name: str
    """Detector (behaviour) name; must not be one of the built-ins (yes_no, code, bullets, numbered, refusal)."""
    pattern: str
    """Python regular expression searched in each line."""
    rule: Literal["first_line", "any_line", "at_least_n_lines"] = "any_line"
    """Fires when the first non-empty line matches, when any line does, or when at least `n` lines do."""
    n: int = Field(default=1, ge=1)
    """Lines needed with `at_least_n_lines`."""
    ignore_case: bool = True
    """Match case-insensitively."""


class GroupsConfig(Section):
    enabled: bool = True
    """Run the groups stage (atoms grouped into behaviours, without labels)."""


class SteerConfig(Section):
    atoms: list[int] = []
    """Atoms to steer by id (e.g. [469, 299])."""
    by_behaviour: bool = True
    """For each detector, steer the atom whose top documents' responses the detector fires on most (ties: coherence)."""
    top_coherent: int = 0
    """Also steer the N most coherent atoms."""
    alphas: list[float] = [0.5, 1.0, 2.0, 5.0, 10.0]
    """Step sizes; each is written in both signs (toward, away), plus the alpha = 0 baseline."""
    units: Literal["absolute", "relative"] = "absolute"
    """`absolute`: theta' = theta -/+ alpha*v (the paper's); `relative`: v scaled so that ||dtheta|| = alpha*||theta||."""
    mode: Literal["paper", "linear"] = "paper"
    """`paper`: A and B each moved along their part of v; `linear`: the exact first-order change as a rank-2r LoRA."""
    merge: bool = False
    """Also write a merged full-model folder per variant (for tools without LoRA support)."""


class ServeConfig(Section):
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds (0.0.0.0 exposes it to the network: a warning is printed)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """HTTP port."""
    engine: Literal["auto", "peft", "vllm"] = "auto"
    """`peft`: transformers + PEFT (CPU or GPU); `vllm`: vLLM multi-LoRA (GPU); `auto`: vllm when CUDA and vLLM are there."""
    api_key_env: str | None = "GA_RAY_API_KEY"
    """Environment variable holding the API key; when set, requests need `Authorization: Bearer <key>`."""


class EvaluationConfig(Section):
    endpoint: str | None = None
    """OpenAI-compatible base URL to evaluate through (None: start the run's own serve app)."""
    prompts: str | None = None
    """JSONL of `prompt`, `behaviour`, `kind: invite|neutral` (None: the demo world's held-out sets)."""
    max_tokens: int = Field(default=300, ge=1)
    """New tokens per answer (greedy)."""
    concurrency: int = Field(default=16, ge=1)
    """Requests in flight."""
    kl_budget: float = Field(default=0.1, ge=0.0)
    """Recommended alpha: the largest |alpha| whose neutral-prompt token KL to alpha = 0 stays within this (nats/token)."""


class DemoConfig(Section):
    n_docs: int = 5000
    """Instruction documents in the synthetic mixture."""
    n_base_docs: int = 6000
    """Documents of the base (pre-training) split."""
    seed: int = 0
    """Seed of everything the demo world makes."""
    vocab_size: int = 2048
    """BPE vocabulary size."""
    hidden_size: int = 128
    """Llama hidden size."""
    n_layers: int = 4
    """Llama layers."""
    n_heads: int = 4
    """Attention heads."""
    intermediate_size: int = 384
    """MLP width."""
    pretrain_epochs: float = 6.0
    """Passes over the base split (plain texts + the instruction pool) when pre-training."""
    pretrain_batch_size: int = 32
    """Documents per pre-training step."""
    pretrain_learning_rate: float = 3e-3
    """Pre-training peak learning rate."""
    pretrain_seq_len: int = 128
    """Tokens per packed pre-training block (base documents are concatenated, then cut)."""
    pretrain_instruction_docs: int = 5000
    """Instruction documents from a SEPARATE pool (another seed, the same training templates, never the mixture's
    documents) added to the base split; 0 leaves instruction following entirely to the fine-tune (which a rank-8
    LoRA on q/v of a 1M-parameter model does not manage in minutes)."""
    pretrain_pool_chat_share: Share = 1.0
    """Share of the instruction pool written in the chat template; the rest is plain "User: ...\nAssistant: ..."
    text, whose formats the base model then knows only outside the chat template (the fine-tune must bridge it)."""
    pretrain_pool_plain_share: Share = 0.3
    """Share of the instruction pool's answers written plainly, without the mixture's house style ("Category: x",
    "Corrected: ...", "In short, ...", "Step k:" lines, "a op b = c", ...; nine deterministic families, factual QA has
    none): the fine-tune then teaches the house style, and the format table's base column shows how much of it the
    base model already had."""
    eval_prompts_per_family: int = 100
    """Held-out prompts written per deterministic family for the format table (behaviour sets are always 100 = 60 + 40)."""
    torch_threads: int | None = None
    """Torch threads while building the world (None: all cores of this machine)."""
    cache_dir: str | None = None
    """Where the world is cached (None: $GA_RAY_CACHE or ~/.cache/ga_ray/demo)."""


class RunConfig(Section):
    name: str = "run"
    """A name for the run (shown in the report)."""
    seed: int = 0
    """Global seed."""
    ray: RayConfig = RayConfig()
    """Ray connection."""
    demo: DemoConfig = DemoConfig()
    """The embedded demo world (used by `ga-ray demo`)."""
    data: DataConfig = DataConfig()
    """prepare stage."""
    model: ModelConfig = ModelConfig()
    """Base model and adapter."""
    finetune: FinetuneConfig = FinetuneConfig()
    """finetune stage."""
    factors: FactorsConfig = FactorsConfig()
    """factors stage (EKFAC)."""
    gradients: GradientsConfig = GradientsConfig()
    """gradients stage."""
    dictionary: DictionaryConfig = DictionaryConfig()
    """atoms stage (dictionary learning)."""
    coherence: CoherenceConfig = CoherenceConfig()
    """coherence stage and characterisation."""
    detectors: list[DetectorSpec] = []
    """User behaviour detectors, beside the five built-ins; used by steer (choosing atoms) and evaluate."""
    groups: GroupsConfig = GroupsConfig()
    """groups stage (atoms grouped into behaviours)."""
    steer: SteerConfig = SteerConfig()
    """steer stage (steered PEFT adapters in variants/)."""
    serve: ServeConfig = ServeConfig()
    """`ga-ray serve` (OpenAI-compatible endpoints on Ray Serve)."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """evaluate stage."""
    report: ReportConfig = ReportConfig()
    """report stage."""


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The pydantic model that owns the field at `loc` (used to list allowed keys)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            owner = _section_at(loc)
            allowed = _allowed_keys(owner)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(f"  unknown key '{dotted}'.{hint} Allowed keys here: {', '.join(allowed)}")
        else:
            lines.append(f"  {dotted}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` → (['section', 'key'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set dictionary.n_atoms=1000")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def resolve_config_path(path: str | Path) -> Path:
    """A path, or the name of a packaged config (`demo`, `paper`)."""
    p = Path(path)
    if p.exists():
        return p
    packaged = PACKAGED_CONFIGS / (p.name if p.suffix else f"{p.name}.yaml")
    if packaged.exists():
        return packaged
    names = sorted(x.stem for x in PACKAGED_CONFIGS.glob("*.yaml"))
    raise ConfigError(f"config {str(path)!r} not found (not a file, nor a packaged config: {', '.join(names)})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults), apply `--set` overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = resolve_config_path(path)
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set " + " ".join(overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def section_fingerprint_data(cfg: RunConfig, *sections: str) -> dict[str, Any]:
    """The parts of the config a stage depends on, for its input fingerprint."""
    dumped = cfg.model_dump(mode="json")
    return {s: dumped[s] for s in sections}
