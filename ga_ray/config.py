"""Typed configuration for every stage.

One pydantic model per stage, each field documented by its docstring (pydantic turns the attribute
docstrings into field descriptions, which `ga-ray config --help-fields` prints). Configs load from
YAML, take `--set section.key=value` overrides from the CLI, and are saved into the run directory.
Unknown keys are errors that name the key and list the allowed ones.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ga_ray.errors import ConfigError

PACKAGED_CONFIGS = Path(__file__).parent / "configs"

Share = Annotated[float, Field(ge=0.0, le=1.0)]
"""A fraction between 0 and 1."""
PositiveInt = Annotated[int, Field(ge=1)]
"""A count of at least 1."""
Positive = Annotated[float, Field(gt=0.0)]
"""A number above 0."""
NonNegative = Annotated[float, Field(ge=0.0)]
"""A number of at least 0."""
GpuCount = Literal["auto"] | Annotated[float, Field(ge=0.0)]
"""GPUs per worker: `auto` or a number of at least 0."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class Workers(Section):
    """The resource fields every stage that starts Ray workers shares (one policy: `ga_ray.resources.plan_workers`)."""

    num_workers: PositiveInt = 1
    """Ray workers of this stage (Ray Train workers, or the actors of its pool)."""
    cpus_per_worker: Positive = 1.0
    """CPUs Ray reserves per worker (fractions are fine; shrunk when the workers would leave no CPU for reading the
    data). The worker's torch threads are this, rounded down (at least 1)."""
    gpus_per_worker: GpuCount = "auto"
    """GPUs per worker: `auto` is 1 when the Ray cluster has GPUs (its resources, not the driver's CUDA), else 0."""


RENAMED_KEYS: dict[str, dict[str, str]] = {
    "finetune": {"use_gpu": "gpus_per_worker"},
    "factors": {"use_gpu": "gpus_per_worker"},
    "dictionary": {"use_gpu": "gpus_per_worker"},
    "gradients": {"num_actors": "num_workers", "cpus_per_actor": "cpus_per_worker", "num_gpus": "gpus_per_worker"},
    "coherence": {"num_actors": "num_workers", "cpus_per_actor": "cpus_per_worker", "num_gpus": "gpus_per_worker"},
}
"""Keys renamed when the resource fields were unified: section -> {old name: new name}."""


class RayConfig(Section):
    address: str | None = None
    """Ray cluster to join (e.g. `auto` or `ray://host:10001`). None starts a local Ray in-process."""
    num_cpus: PositiveInt | None = None
    """CPUs for a local Ray (None: all of this machine's)."""
    execution_no_progress_timeout_s: Positive = 600.0
    """Ray Data raises instead of hanging when a pipeline makes no progress for this long."""


class DataConfig(Section):
    path: str | None = None
    """Training documents: a JSONL file, a Parquet file or folder, or a `datasets.save_to_disk` folder."""
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = "auto"
    """Input format; `auto` decides from the path."""
    messages_column: str = Field(default="messages", min_length=1)
    """Column holding chat turns as a list of {role, content}."""
    prompt_column: str = Field(default="prompt", min_length=1)
    """Column holding the prompt, used when there is no messages column."""
    response_column: str = Field(default="response", min_length=1)
    """Column holding the response, used when there is no messages column."""
    id_column: str = Field(default="id", min_length=1)
    """Column used as `doc_id` when present (integers); otherwise the row's position in the source."""
    system_prompt: str | None = None
    """System message prepended to prompt/response rows (None: none)."""
    max_length: int = Field(default=512, ge=2)
    """Documents longer than this many tokens are truncated (and counted); at least 2 (a prompt and a response token)."""
    skip_bad_rows: bool = False
    """Write bad rows to `data/rejected.jsonl` with their reason and prepare the rest, instead of failing with the list of bad rows."""
    max_rejected_share: Share = 0.05
    """With skip_bad_rows: stop (with the reasons counted) when more than this share of the source's rows is rejected (1.0: no limit)."""
    special_token_text: Literal["keep", "escape", "reject"] = "keep"
    """Text in a turn that spells a special token of the tokenizer (e.g. `<|eos|>` typed in a document) is always counted
    and reported. `keep`: it becomes that control token (as the tokenizer parses it); `escape`: it is tokenised as
    plain text; `reject`: the row is a bad row."""
    num_blocks: int | None = Field(default=None, ge=1)
    """Ray Data blocks for tokenisation (None: Ray decides)."""
    split: str | None = None
    """Split to prepare when data.path is a saved `datasets.DatasetDict` (None: its only split, or `train`)."""
    batch_size: int = Field(default=256, ge=1)
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
    r: PositiveInt = 8
    """LoRA rank."""
    alpha: Positive = 16.0
    """LoRA alpha; the scale is alpha/r (alpha/sqrt(r) with rsLoRA)."""
    target_modules: Annotated[list[str], Field(min_length=1)] = ["q_proj", "v_proj"]
    """Module names that get LoRA adapters."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """LoRA dropout during fine-tuning (always inactive during analysis)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling."""


class FinetuneConfig(Workers):
    """finetune stage; `num_workers` are Ray Train workers (DDP; gloo on CPU, NCCL on GPU)."""

    enabled: bool = True
    """Run the finetune stage. Off when you bring your own adapter (`model.adapter`)."""
    lora: LoraConfig = LoraConfig()
    """The adapter to train."""
    epochs: Positive = 3.0
    """Passes over the data."""
    learning_rate: Positive = 2e-3
    """AdamW peak learning rate (linear warm-up, cosine decay)."""
    weight_decay: NonNegative = 0.0
    """AdamW weight decay."""
    warmup_fraction: Share = 0.05
    """Share of the steps spent warming up."""
    batch_size: PositiveInt = 32
    """Documents per optimiser step, summed over workers."""
    eval_prompts: PositiveInt = 100
    """Held-out prompts per family / behaviour for the format table at the end (demo world only)."""
    max_new_tokens: PositiveInt = 96
    """Greedy decoding length for the format table."""
    format_eval_set: str | None = None
    """A demo world's held-out prompt folder; when set, the stage ends with the format table."""
    format_eval_base: bool = True
    """Also score the base model (adapter off) on the same prompts, so the table shows what the fine-tune changed."""
    eval_batch_size: PositiveInt = 64
    """Prompts per batched greedy generation in the format table (left padding)."""
    max_grad_norm: NonNegative = 1.0
    """Gradient clipping (global L2 norm over the LoRA parameters); 0 disables."""
    seed: int = 0
    """Seed of the LoRA initialisation and of the data order."""
    torch_threads: PositiveInt | None = None
    """Torch intra-op threads per Train worker and for the format table (None: cpus_per_worker rounded up)."""
    storage_path: str | None = None
    """Ray Train storage for the checkpoint hand-off (None: a hidden folder in the run directory, removed after the
    stage). On a multi-node cluster set shared storage (NFS path or s3://...)."""
    in_driver_max_docs: Annotated[int, Field(ge=0)] = 10_000
    """With one CPU worker, up to this many documents are trained on in the driver process (the same loop and
    rows, the same adapter bit for bit, no TorchTrainer to start: ~15 s of controller, worker and data-split
    actors on 2 cores). A crash there fails the stage. 0: always Ray Train."""


def _yaml_bool_to_word(v: Any) -> Any:
    """YAML reads `fisher: true` as a boolean; the option is the word."""
    return "true" if v is True else v


class FactorsConfig(Workers):
    """factors stage; `num_workers` are Ray Train workers (the blocks' eigendecompositions are spread over them)."""

    fisher: Annotated[Literal["true", "empirical"], BeforeValidator(_yaml_bool_to_word)] = "true"
    """`true`: labels sampled from the model at response positions (seeded by doc_id); `empirical`: the data's."""
    eigenvalues: Literal["ekfac", "kfac"] = "ekfac"
    """Rank and scale by the EKFAC-corrected Λ, or by λ_S·λ_A (what the paper's code did)."""
    top_k: PositiveInt = 50
    """Eigen-pairs (i, j) kept per LoRA block; D = blocks × top_k."""
    epsilon: NonNegative = 1e-6
    """Damping added to the eigenvalues before the square root."""
    batch_size: PositiveInt = 16
    """Documents per forward/backward pass."""
    lambda_max_docs: PositiveInt | None = None
    """Estimate Λ on a seeded subsample of this many documents (None: all)."""
    reduction: Literal["sum", "mean"] = "sum"
    """Per-document loss: sum over response tokens (the paper's) or mean."""
    seed: int = 0
    """Seed of the true-Fisher label draws."""
    max_tokens_per_batch: PositiveInt = 4096
    """Token budget per forward/backward pass (documents × padded length); documents are sorted by
    length within windows of 16 × batch_size, so padding stays small."""
    covariance_dtype: Literal["float32", "float64"] = "float32"
    """dtype of each batch's covariance token sums (accumulated across batches in float64 either way)."""
    save_covariances: bool = True
    """Also store C_A and C_S in factors.safetensors (not needed to project; large for big models)."""
    save_from: Literal["worker", "driver"] = "worker"
    """Who writes factors/: rank 0 worker (run directory on a filesystem every node sees, as the other
    stages need too) or the driver (factors returned through Ray; for clusters without a shared filesystem)."""
    in_driver_max_docs: Annotated[int, Field(ge=0)] = 10_000
    """With one CPU worker, up to this many documents are computed in the driver process (the same passes over
    the same rows, no TorchTrainer to start: ~15 s of controller, worker and data-split actors on 2 cores).
    A crash there fails the stage. 0: always Ray Train."""


class GradientsConfig(Workers):
    """gradients stage; `num_workers` are the actors of a Ray Data pool, each holding the model, adapter and factors once."""

    batch_size: PositiveInt = 16
    """Maximum documents per forward/backward pass."""
    max_tokens_per_batch: PositiveInt = 4096
    """Token budget per batch (padded length × documents); batches are length-bucketed."""
    store_raw: bool = False
    """Also write the raw LoRA-space gradient (float16) for small models."""
    reduction: Literal["sum", "mean"] = "sum"
    """Per-document loss: sum over response tokens (the paper's) or mean."""
    window_docs: PositiveInt = 1024
    """Documents per Ray Data batch handed to an actor; each window is sorted by length and cut into token-budget batches (bigger: less padding, more work redone if an actor dies)."""
    max_retries: Annotated[int, Field(ge=0)] = 3
    """Times Ray restarts a dead actor and retries its window (crash, OOM kill, preemption) before the stage fails."""
    compile: bool = False
    """torch.compile the parts of the model the pass does not hook (each layer's MLP and norms), once per
    actor; for GPUs, where it fuses their elementwise kernels. Compiling costs seconds to minutes per actor
    (more than it saves on the demo's CPU sizes) and needs a C++ compiler on CPU."""
    in_driver_max_docs: Annotated[int, Field(ge=0)] = 10_000
    """With one CPU worker, up to this many documents are computed in the driver process (the same pass and
    window files, no Ray Data pipeline or actor to start: their start-up was 5-20 s of a 20-50 s stage at
    the demo's 5,000 documents on 2 cores). A crash there fails the stage instead of retrying a window.
    0: always the actor pool."""


class DictionaryConfig(Workers):
    """atoms stage; `num_workers` are the Ray actors that code blocks of rows in parallel."""

    backend: Literal["torch", "sklearn"] = "torch"
    """`torch`: our distributed online learner; `sklearn`: the paper's exact MiniBatchDictionaryLearning call."""
    n_atoms: PositiveInt = 500
    """Dictionary size K."""
    alpha: Positive = 0.1
    """L1 penalty α of scikit-learn's objective."""
    batch_size: PositiveInt | Literal["auto"] = "auto"
    """Rows per online step. `auto`: for our learner 2·K, at least 256 and at most a quarter of the rows
    (each step's Gram matrix and atom sweep cost 3·K²·D whatever the batch, so small batches spend most
    of an epoch there: with K 500 and the stopping rule, 1,024 rows per step took 2.2× less CPU time than
    256 on planted atoms at D 6,800 and 1.9× less on the demo gradients, at objectives 3.4% and 0.4% higher,
    both below scikit-learn's; `ga_ray.atoms.trainer.auto_batch_size`); with `backend: sklearn`, 256,
    the paper's."""
    max_epochs: Positive = 20.0
    """Upper bound on passes over the data."""
    stop_on: Literal["train", "heldout"] = "train"
    """Objective the stopping rule watches. `train`: the training stream's own objective (each batch
    costed against the dictionary before it learns from it, over the last min(epoch, 500) steps; free),
    i.e. the objective of the documents this stage encodes; `heldout`: the objective of held-out rows
    (needs `heldout_fraction` > 0; they are not trained on and are coded at every check)."""
    tol: NonNegative = 1e-2
    """`train`: stop when the objective improves by less than this (relative) per epoch at `patience`
    consecutive checks (at epoch ends when the window is one epoch, else every half window). `heldout`: stop when it improves by less than this
    (relative to the best) for `patience` checks. With `forget_exponent` 4, the epochs after the
    objective's gain falls below 1% per epoch bought at most 0.4% more on the demo gradients and planted
    atoms (0.5% ran the demo 50% longer for 0.4%)."""
    patience: PositiveInt = 1
    """Checks below `tol` before stopping."""
    heldout_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Share of rows kept aside (not trained on) to measure a held-out objective (recorded; the
    stopping objective with `stop_on=heldout`)."""
    lasso_tol: Positive = 1e-6
    """Tolerance of the sparse coder (max KKT violation)."""
    lasso_max_iter: PositiveInt = 500
    """Iterations cap of the sparse coder per batch."""
    warm_start: bool = True
    """Start each row's coder from its codes of the previous epoch (same codes, less work; kept in the
    driver's memory, at most 32 nonzeros and 8 bytes each per row, 256 MB in all)."""
    forget_exponent: Annotated[float, Field(ge=0.0)] = 4.0
    """ρ of the statistics' forgetting weights: while fewer than `batch_size` steps have run, batch s of t
    weighs (s/t)^ρ in A and B (Mairal et al. 2010's ρ; 1 is scikit-learn's rule exactly, 0 weighs all
    batches alike), later the memory is about `batch_size`/ρ steps. Larger ρ forgets the early codes,
    made against a poor dictionary, sooner: on the demo gradients and planted atoms ρ = 4 reached
    scikit-learn's objective in 20-25% (demo) and 50% (planted) fewer steps than ρ = 1 and went on to a
    lower one (`ga-ray bench dictionary`); on structureless Gaussian rows it ended 1.7% higher."""
    matmul_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Type of the learner's two largest products, the batch's correlations X·Dᵀ and the atom sweep's
    A·D: `auto` is bfloat16 where the hardware multiplies it natively (a CUDA GPU that supports it; a CPU
    with AVX512-BF16, AMX-BF16 or ARM BF16), else float32. The dictionary, its statistics, the Gram
    matrix and the final codes stay float32 (`ga_ray.atoms.precision`). On the 2-core AMD EPYC of
    `docs/benchmarks.md`, bfloat16 ran those products at 2.1× the float32 rate and the fit ended at the
    same objective. `float32` reproduces earlier runs."""
    init: Literal["data", "svd"] = "data"
    """Initial dictionary: the first K rows of the shuffled stream (`data`), or the top right singular
    vectors of a sample of 2K rows (`svd`, like scikit-learn's start; fewer epochs on some data, but
    it can stall on planted atoms, where `data` recovers more)."""
    checkpoint_every: PositiveInt = 20
    """Online steps between checkpoints."""
    seed: int = 42
    """Seed of initialisation, shuffling and resampling."""
    n_seeds: PositiveInt = 1
    """Fit this many seeds and report atom stability (Hungarian matching)."""
    kmeans_clusters: PositiveInt | None = 14
    """k-means baseline clusters (dask-ml); None skips the baseline."""
    eval_every: PositiveInt | None = None
    """Online steps between stopping checks (None: `train`, at epoch ends when an epoch is at most 500
    steps, else every 250; `heldout`, once per epoch, at most every 200 steps)."""
    heldout_max_rows: PositiveInt = 10_000
    """Cap on held-out rows (they are kept in the workers' memory and coded at every check)."""
    shuffle_buffer_mb: Positive = 512.0
    """Rows shuffled together (a window of row groups), in MB of float32 rows, summed over workers."""
    max_piece_rows: PositiveInt = 8192
    """Parquet row groups larger than this are read in slices of this many rows."""
    dup_threshold: Annotated[float, Field(gt=0.0, le=1.0)] | None = 0.99
    """Resample an atom whose |cos| with another exceeds this (None: never)."""
    encode_batch_size: PositiveInt = 1024
    """Documents per `map_batches` call of the final encoding pass."""
    in_driver_mb: NonNegative = 64.0
    """Gradients of at most this size on disk (MB, all files) are coded in the driver process instead of
    Ray actors, whose start took 3-10 s per pool on a 2-core machine: the learner's coder when
    `num_workers` is 1, the final encoding pass and the k-means baseline (on dask's threads). The same
    code on the same rows, so the same codes and clusters.
    64 MB is about 20,000 documents at the demo's D = 800. 0: always actors. Not used on GPU."""
    sklearn_max_iter: PositiveInt = 100
    """`max_iter` (epochs) of the `sklearn` backend (the paper's 100)."""


class CoherenceConfig(Workers):
    """coherence stage; `num_workers` are the actors recomputing raw gradients."""

    top_docs: Annotated[int, Field(ge=2)] = 20
    """Documents per atom used for coherence and shown in the report (coherence is a mean over pairs: at least 2)."""
    batch_size: PositiveInt = 16
    """Documents per gradient pass."""
    max_tokens_per_batch: PositiveInt = 4096
    """Token budget per gradient pass (padded length × documents); batches are length-bucketed."""
    label_endpoint: str | None = None
    """OpenAI-compatible base URL used to name atoms from their excerpts (None: keywords only)."""
    label_model: str | None = None
    """Model name sent to `label_endpoint`."""
    label_column: str | None = "task"
    """Sidecar label column used only for the discovery score (None or absent: no score)."""
    group_memory_mb: Positive = 1024.0
    """Memory for the per-atom gradient sums of one work item (atoms per item × P × 4 bytes); bounds each actor."""
    dtype: Literal["float32", "model"] = "float32"
    """Weights dtype when recomputing raw gradients: float32 (exact cosines) or the model's `model.dtype`."""
    examples_per_atom: Annotated[int, Field(ge=0)] = 5
    """Top documents per atom kept with prompt/response excerpts in atoms/characterisation.json."""
    excerpt_chars: PositiveInt = 300
    """Characters kept of each prompt and response excerpt."""
    n_keywords: Annotated[int, Field(ge=0)] = 8
    """Characteristic words per atom (log-odds against the whole data set)."""
    background_docs: PositiveInt = 20000
    """Responses decoded as the background of the characteristic words (a seeded sample above this)."""
    label_top_atoms: Annotated[int, Field(ge=0)] = 50
    """Most coherent atoms sent to `label_endpoint` for a label."""
    label_timeout_s: Positive = 30.0
    """Timeout of one label request, in seconds."""
    label_api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (sent as a Bearer token when set)."""


class ReportConfig(Section):
    top_atoms: PositiveInt = 50
    """Atoms in the report's table."""
    examples_per_atom: Annotated[int, Field(ge=0)] = 2
    """Example documents shown per atom in the table."""
    excerpt_chars: PositiveInt = 160
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
    weight_coactivation: float = Field(default=1.0, ge=0.0)
    """Weight of co-activation (cosine of the atoms' coefficient columns over documents) in the atom similarity."""
    weight_gradient: float = Field(default=0.0, ge=0.0)
    """Weight of the cosine of the atoms' mean unit gradient (z) over their top documents (0: on the demo world
    it barely separates behaviours, and averaging it in halves the group discovery score)."""
    weight_dictionary: float = Field(default=0.0, ge=0.0)
    """Weight of the cosine of the oriented dictionary rows (the atoms' own directions)."""
    method: Literal["average", "complete", "single", "weighted"] = "average"
    """scipy linkage method on the distance 1 - similarity."""
    cut: int | None = Field(default=None, ge=1)
    """Number of groups; default: the dendrogram cut with the best `criterion` in [min_groups, max_groups]."""
    criterion: Literal["modularity", "silhouette"] = "modularity"
    """How the cut is chosen: the largest modularity of the cut's partition in the atom graph (weights max(S, 0),
    S the combined similarity), or the largest silhouette on the distances 1 - S."""
    resolution: float = Field(default=1.0, gt=0.0)
    """Modularity resolution gamma (larger: more, smaller groups)."""
    graph_neighbours: int | None = Field(default=None, ge=1)
    """Keep only each atom's N most similar atoms as edges of the modularity graph (None: every positive similarity)."""
    min_groups: int = Field(default=2, ge=2)
    """Smallest cut the criterion considers."""
    max_groups: int = Field(default=100, ge=2)
    """Largest cut the criterion considers."""
    top_docs: int = Field(default=20, ge=2)
    """Top documents per group (by summed oriented coefficient of its members): coherence, words, explorer."""
    raw_coherence: bool = True
    """Score each group's coherence on the RAW gradients of its top documents (a small Ray pass, as the coherence stage)."""
    kmeans_baseline: bool = True
    """With a label column: also score scikit-learn k-means with as many clusters as groups and as families."""
    min_docs: int = Field(default=2, ge=1)
    """Atoms with fewer documents of positive oriented coefficient are left ungrouped (tree.json `ungrouped`)."""
    neighbours: int = Field(default=5, ge=0)
    """Nearest atoms (by the combined similarity) kept per atom in tree.json, for the explorer."""


class SteerComposition(Section):
    """A steered variant along a weighted sum of atoms' (oriented, unprojected) vectors."""

    atoms: list[int] = Field(min_length=1)
    """Atom ids."""
    weights: list[float] | None = None
    """One weight per atom (None: all 1.0)."""


class SteerConfig(Section):
    atoms: list[int] = []
    """Atoms to steer by id (e.g. [469, 299])."""
    by_behaviour: bool = True
    """For each detector, steer the atom whose top documents' responses the detector fires on most (ties: coherence)."""
    top_docs: int = Field(default=20, ge=1)
    """Top documents per atom (by oriented coefficient) whose responses the detectors are run on."""
    min_docs: int = Field(default=5, ge=1)
    """Atoms with fewer top documents than this are not chosen by behaviour (a rate over 2 documents says little)."""
    top_coherent: int = Field(default=0, ge=0)
    """Also steer the N most coherent atoms."""
    groups: list[int] = []
    """Atom groups (ids of groups/groups.parquet) to steer along the sum of their member atoms' vectors."""
    compositions: list[SteerComposition] = []
    """Variants along weighted sums of atoms, e.g. [{atoms: [469, 299], weights: [1.0, 0.5]}]."""
    alphas: list[Annotated[float, Field(gt=0.0)]] = [0.5, 1.0, 2.0, 5.0, 10.0]
    """Step sizes; each is written in both signs (toward, away), plus the alpha = 0 baseline."""
    units: Literal["absolute", "relative"] = "absolute"
    """`absolute`: theta' = theta -/+ alpha*v (the paper's); `relative`: v scaled so that ||dtheta|| = alpha*||theta||."""
    mode: Literal["paper", "linear", "both"] = "paper"
    """`paper`: A and B each moved along their part of v; `linear`: the exact first-order change as a rank-2r LoRA; `both`: each variant in both modes."""
    controls: bool = True
    """Also write, per behaviour-chosen atom, a random direction of the same norm and a supervised direction (kinds random, supervised)."""
    control_alphas: list[Annotated[float, Field(gt=0.0)]] | None = [10.0]
    """Alphas of the control variants, both signs (None: every alpha of `alphas`)."""
    vllm_rank: bool = True
    """Zero-pad each variant to a rank in vLLM's allowed max_lora_rank set (same weights change; rank 8 and 16 need no padding)."""
    seed: int = 0
    """Seed of the random control directions (one per atom, the same for every alpha and sign)."""
    merge: bool = False
    """Also write a merged full-model folder per variant (`<variant>/merged/`, for tools without LoRA support)."""


class ServeConfig(Workers):
    """`ga-ray serve`. The Workers fields are the engine replicas: `num_workers` replicas, each holding the base model
    and every variant, with `cpus_per_worker` / `gpus_per_worker` (torch threads: the CPUs rounded down)."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds (0.0.0.0 exposes it to the network: a warning is printed)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """HTTP port."""
    engine: Literal["auto", "peft", "vllm"] = "auto"
    """`peft`: transformers + PEFT (CPU or GPU); `vllm`: vLLM multi-LoRA (GPU); `auto`: vllm when CUDA and vLLM are there."""
    api_key_env: str | None = "GA_RAY_API_KEY"
    """Environment variable holding the API key; when set, requests need `Authorization: Bearer <key>`."""
    max_batch_size: int = Field(default=16, ge=1, le=1024)
    """Requests (of any variants) batched into one engine call by `@serve.batch` (16: the evaluation's concurrency)."""
    batch_wait_timeout_s: float = Field(default=0.02, ge=0.0, le=10.0)
    """How long a batch waits to fill before it runs anyway."""
    max_ongoing_requests: int = Field(default=16, ge=1)
    """Requests an engine replica works on at once (at least max_batch_size)."""
    max_queued_requests: int = Field(default=64, ge=0)
    """Requests waiting for an engine replica; beyond this a request gets 503 with Retry-After (never an unbounded backlog)."""
    retry_after_s: int = Field(default=1, ge=0)
    """Retry-After seconds sent with a 503."""
    max_tokens_limit: int = Field(default=4096, ge=1)
    """Largest `max_tokens` a request may ask for (larger: 400)."""
    max_top_logprobs: int = Field(default=20, ge=0, le=100)
    """Largest `logprobs` (completions) / `top_logprobs` (chat) a request may ask for."""
    max_prompts_per_request: int = Field(default=64, ge=1)
    """Prompts one /v1/completions request may carry (a list prompt)."""
    refresh_interval_s: float = Field(default=1.0, ge=0.0)
    """Shortest time between two scans of RUN_DIR/variants/ for new folders (also rescanned on an unknown id)."""


class EvaluationConfig(Section):
    endpoint: str | None = None
    """OpenAI-compatible base URL to evaluate through (None: start the run's own serve app)."""
    prompts: str | None = None
    """JSONL of `prompt`, `behaviour`, `kind: invite|neutral` (None: the demo world's held-out sets)."""
    max_tokens: int = Field(default=300, ge=1)
    """New tokens per answer (greedy)."""
    concurrency: int = Field(default=16, ge=1)
    """Requests in flight."""
    prompts_per_request: int = Field(default=1, ge=1, le=64)
    """Prompts of one model sent together as one request's prompt list (fewer HTTP round trips; a failed request
    fails each of its prompts, each counted)."""
    kl_budget: float = Field(default=0.1, ge=0.0)
    """Recommended alpha: the largest |alpha| whose neutral-prompt token KL to alpha = 0 stays within this (nats/token)."""
    kl_top_k: int = Field(default=20, ge=1, le=100)
    """Top-k log-probs per position asked of the endpoint for the token KL (a lower bound of the exact KL, exact
    when k covers the distributions' support; vLLM allows up to 20 by default)."""
    behaviours: list[str] = []
    """Behaviour prompt sets to evaluate (empty: every set the prompts provide)."""
    variants: list[str] = []
    """Variant names to evaluate, as shell patterns (e.g. `atom*-a2-*`; empty: every variant); the alpha = 0
    baseline, `finetuned` and `base` are always evaluated."""
    builtins: list[Literal["finetuned", "base"]] = ["finetuned", "base"]
    """Built-in model ids evaluated on every prompt set beside the baseline variant (`finetuned` is the same adapter
    as the baseline: a check that the endpoint serves it identically)."""
    retries: int = Field(default=3, ge=0, le=20)
    """Retries of a failed request (with exponential backoff) before it is counted as a failure."""
    backoff_s: float = Field(default=0.5, ge=0.0)
    """First wait before a retry; doubled after each failed attempt."""
    timeout_s: float = Field(default=300.0, gt=0.0)
    """Per-request timeout (a CPU engine under load answers slowly)."""
    chunk_rows: int = Field(default=64, ge=1)
    """Finished requests per durable Parquet chunk (what a killed evaluation can lose at most, per store)."""
    split_seed: int = 0
    """Seed of the stratified split of each prompt set into a selection half (best alpha chosen) and a report half."""
    perplexity_docs: str | None = None
    """JSONL of held-out documents (`prompt`, `response`) for the perplexity side effect (None: in a demo run,
    held-out documents freshly drawn from the demo world's held-out templates; otherwise not measured)."""
    perplexity_docs_per_family: int = Field(default=2, ge=0)
    """Demo held-out documents per task family for the perplexity side effect."""
    collapse_degenerate_rise: Share = 0.2
    """A variant has collapsed when its share of degenerate answers (empty, looping, no stop) exceeds the alpha = 0
    baseline's by this much ..."""
    collapse_format_drop: Share = 0.3
    """... or when its format rate on the neutral prompts falls this far below the baseline's; a collapsed
    variant's suppression is flagged, not counted as steering."""
    goal_delta_pp: float = Field(default=14.0, ge=0.0)
    """Goal check: a behaviour moves by at least this many percentage points from alpha = 0 ..."""
    goal_p: float = Field(default=0.01, gt=0.0, le=1.0)
    """... at a Holm-corrected p below this, within the KL budget, and beyond the random control."""
    controls_at_recommended: bool = True
    """With steer.controls: after a first pass, write (through the steer stage's add_variant) and evaluate the random
    and supervised controls at each atom's recommended alpha, both signs, where the steer stage wrote none."""


class DemoConfig(Section):
    n_docs: PositiveInt = 5000
    """Instruction documents in the synthetic mixture."""
    n_base_docs: PositiveInt = 6000
    """Documents of the base (pre-training) split."""
    seed: int = 0
    """Seed of everything the demo world makes."""
    vocab_size: Annotated[int, Field(ge=300)] = 2048
    """BPE vocabulary size (at least the 256 byte tokens, the special tokens and a few merges)."""
    hidden_size: PositiveInt = 128
    """Llama hidden size."""
    n_layers: PositiveInt = 4
    """Llama layers."""
    n_heads: PositiveInt = 4
    """Attention heads."""
    intermediate_size: PositiveInt = 384
    """MLP width."""
    pretrain_epochs: NonNegative = 6.0
    """Passes over the base split (plain texts + the instruction pool) when pre-training."""
    pretrain_batch_size: PositiveInt = 32
    """Documents per pre-training step."""
    pretrain_learning_rate: Positive = 3e-3
    """Pre-training peak learning rate."""
    pretrain_seq_len: Annotated[int, Field(ge=2)] = 128
    """Tokens per packed pre-training block (base documents are concatenated, then cut)."""
    pretrain_instruction_docs: Annotated[int, Field(ge=0)] = 5000
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
    eval_prompts_per_family: PositiveInt = 100
    """Held-out prompts written per deterministic family for the format table (behaviour sets are always 100 = 60 + 40)."""
    torch_threads: PositiveInt | None = None
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
            renamed = RENAMED_KEYS.get(str(loc[0]), {}).get(str(loc[-1])) if len(loc) == 2 else None
            close = [renamed] if renamed else difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            if renamed:
                hint += f" ('{loc[-1]}' was renamed to '{renamed}': every stage now names its workers' resources num_workers, cpus_per_worker, gpus_per_worker.)"
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


def is_saved_run_config(path: Path) -> bool:
    """A run directory's own `config.yaml` (written by the runner), as opposed to a config a user wrote."""
    return path.name == "config.yaml" and (path.parent / "manifest.json").exists()


def migrate_renamed_keys(data: dict[str, Any]) -> list[str]:
    """Rename, in place, the keys of RENAMED_KEYS in a config saved by an older ga-ray; returns 'old -> new' lines.

    Only for a run directory's saved config: a config a user wrote gets the did-you-mean error instead.
    """
    done = []
    for section, renames in RENAMED_KEYS.items():
        node = data.get(section)
        if not isinstance(node, dict):
            continue
        for old, new in renames.items():
            if old in node and new not in node:
                value = node.pop(old)
                if old == "use_gpu" and isinstance(value, bool):
                    value = 1.0 if value else 0.0
                node[new] = value
                done.append(f"{section}.{old} -> {section}.{new}")
    return done


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults), apply `--set` overrides, validate.

    A run directory's saved `config.yaml` written before the resource keys were renamed is migrated
    (the renamed keys are logged once); any other file with an old key gets the did-you-mean error.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = resolve_config_path(path)
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:  # a folder, unreadable, not text
            raise ConfigError(f"{p}: cannot be read as a YAML config ({getattr(exc, 'strerror', None) or exc}); point to a YAML file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
        if is_saved_run_config(p):
            renamed = migrate_renamed_keys(data)
            if renamed:
                logging.getLogger("ga_ray").info("%s: saved by an older ga-ray; renamed %s", p, ", ".join(renamed))
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set " + " ".join(overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


WHERE_ONLY_KEYS: dict[str, set[str]] = {
    "finetune": {"in_driver_max_docs"},
    "factors": {"in_driver_max_docs"},
    "gradients": {"in_driver_max_docs"},
    "dictionary": {"in_driver_mb"},
}
"""Keys that choose only where the same computation runs (the driver or Ray actors, tested to give the
same results): left out of the stages' fingerprints, so that changing them, or a run finished before
they existed, redoes nothing."""


def section_fingerprint_data(cfg: RunConfig, *sections: str) -> dict[str, Any]:
    """The parts of the config a stage depends on, for its input fingerprint.

    The renamed resource keys are fingerprinted under their old names (RENAMED_KEYS), so that runs
    finished before the rename keep their fingerprints and are not redone; WHERE_ONLY_KEYS are left out.
    """
    dumped = cfg.model_dump(mode="json")
    out = {}
    for s in sections:
        section, _, fld = s.partition(".")
        if fld:  # one field of a section, e.g. `model.path`
            out[s] = dumped[section][fld]
            continue
        data = dumped[s]
        legacy = {new: old for old, new in RENAMED_KEYS.get(s, {}).items()}
        skip = WHERE_ONLY_KEYS.get(s, set())
        out[s] = {legacy.get(k, k): v for k, v in data.items() if k not in skip} if isinstance(data, dict) else data
    return out
