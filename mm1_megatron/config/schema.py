"""Typed configuration: one dataclass per component, nested under ``MM1Config``.

Field names are the YAML keys and the dotted override paths, e.g.
``model.llm.num_layers=4`` or ``optimizer.lr_multipliers.connector=2.0``.
Cross-field rules live in ``validation.py`` (the model's in ``model_checks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, get_args

CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# Every choice is declared once, as a Literal: the config loader and validate_config check
# values against it (one list, one message), and code that needs the list reads it with
# typing.get_args (the tuples below).
ConnectorType = Literal["c_abstractor", "avg_pool", "attn_pool", "mlp"]
VisionActivation = Literal["gelu", "quick_gelu", "gelu_tanh"]
# auto: transformer_engine when it imports and CUDA is available, else local; resolved once
# at start (config/machine.py), and the run's saved config.yaml holds the result.
TransformerImpl = Literal["local", "transformer_engine", "auto"]
# Decoder core attention over packed documents (mm1_megatron/models/attention.py).
AttentionKind = Literal["per_document", "dense_mask_reference"]
FP8Format = Literal["hybrid", "e4m3"]
FP8Recipe = Literal["delayed", "current"]
Precision = Literal["auto", "bf16", "fp32"]
LRRule = Literal["mm1", "fixed"]
ScheduleOnResume = Literal["strict", "checkpoint", "config"]
RecomputeMode = Literal["none", "selective", "full"]
Launcher = Literal["auto", "torchrun", "mpi", "none"]
TokenDispatcher = Literal["alltoall", "allgather"]
DataSource = Literal["synthetic", "webdataset"]
TokenizerKind = Literal["synthetic", "sentencepiece", "huggingface"]
ImageDecoder = Literal["pil", "dali"]
InitDevice = Literal["auto", "cpu", "gpu"]
ImageResizeMode = Literal["squash", "crop", "pad"]
ImageDtype = Literal["fp32", "bf16"]
TilingMode = Literal["none", "static", "dynamic"]
OverviewPlacement = Literal["after", "before", "none"]
ConversationPacking = Literal["packed", "one_per_sequence"]
OverlongConversation = Literal["truncate", "drop"]
MicroBatchOrder = Literal["spread", "alternate", "heaviest_first"]
OptimizerSharding = Literal["fully_reshardable", "dp_reshardable"]
TrainingObjective = Literal["language_modeling", "preference"]
PreferenceLoss = Literal["sigmoid", "ipo"]
# The model's top-level parts (MM1Model's children): what model.freeze and
# optimizer.lr_multipliers name, and the units a conversion imports and exports.
ModelPart = Literal["vision_encoder", "connector", "language_model"]
# Few-shot evaluation (mm1_megatron/evaluation): demonstrations drawn at random or by image
# similarity, what a bad dataset entry does, and the VQA answer normalisation.
DemoSelection = Literal["random", "similar"]
OnBadEntry = Literal["stop", "skip"]
VQAMode = Literal["official", "openflamingo"]

CONNECTOR_TYPES = get_args(ConnectorType)
VISION_ACTIVATIONS = get_args(VisionActivation)
TRANSFORMER_IMPLS = get_args(TransformerImpl)
FP8_FORMATS = get_args(FP8Format)
FP8_RECIPES = get_args(FP8Recipe)
PRECISIONS = get_args(Precision)
LR_RULES = get_args(LRRule)
RECOMPUTE_MODES = get_args(RecomputeMode)
LAUNCHERS = get_args(Launcher)
DATA_SOURCES = get_args(DataSource)
# What data.mixture weighs (data/pipeline/mixture.py's SOURCE_IDS, in that order).
DATA_MIXTURE_SOURCES = ("caption", "interleaved", "text", "conversation", "preference", "video")
TOKENIZER_KINDS = get_args(TokenizerKind)
IMAGE_DECODERS = get_args(ImageDecoder)
IMAGE_RESIZE_MODES = get_args(ImageResizeMode)
IMAGE_DTYPES = get_args(ImageDtype)
TILING_MODES = get_args(TilingMode)
MODEL_PARTS = get_args(ModelPart)
OVERVIEW_PLACEMENTS = get_args(OverviewPlacement)


@dataclass
class VisionEncoderConfig:
    """CLIP-style ViT. Defaults are ViT-H/14 at 378 px (MM1's encoder).

    A SigLIP vision tower is ``use_class_token=false, patch_embedding_bias=true,
    pre_layernorm=false, post_layernorm=true, activation=gelu_tanh``. SigLIP 2's NaFlex
    tower is that with ``native_resolution=true``: each image keeps its aspect ratio, its
    patches are embedded by a linear layer over flattened ``p*p*c`` patches, and the
    ``g x g`` position table (``g = image_size // patch_size``) is resized to each
    image's patch grid.
    """

    image_size: int = 378
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1280
    num_layers: int = 32
    num_attention_heads: int = 16
    ffn_hidden_size: int = 5120
    activation: VisionActivation = "quick_gelu"
    use_class_token: bool = True
    patch_embedding_bias: bool = False  # SigLIP's patch convolution has a bias
    pre_layernorm: bool = True  # LayerNorm on the embeddings before the first layer (CLIP)
    post_layernorm: bool = False  # LayerNorm on every output token (SigLIP)
    layernorm_epsilon: float = 1e-5
    image_mean: List[float] = field(default_factory=lambda: list(CLIP_IMAGE_MEAN))
    image_std: List[float] = field(default_factory=lambda: list(CLIP_IMAGE_STD))
    # NaFlex (SigLIP 2): images at their own aspect ratio, as packed patches (see
    # models/vision_encoder.py); max_patches is each image's patch budget (the
    # processor's max_num_patches).
    native_resolution: bool = False
    max_patches: int = 256


@dataclass
class ConnectorConfig:
    """Vision-language connector. ``num_output_tokens`` must be a square (64, 144, ...)."""

    type: ConnectorType = "c_abstractor"
    num_output_tokens: int = 144
    hidden_size: int = 1024  # internal width of the C-Abstractor / pooling stages
    num_blocks_per_stage: int = 3  # C-Abstractor ResNet blocks before and after pooling
    num_readout_layers: int = 2  # MLP readout depth to the LLM width
    num_attention_heads: int = 8  # attention pooling only


@dataclass
class MoEConfig:
    """Mixture of experts in the decoder FFNs. ``num_experts=0`` means dense."""

    num_experts: int = 0
    top_k: int = 2
    layer_frequency: int = 1  # every k-th decoder layer is MoE (layers 0, k, 2k, ...)
    expert_ffn_hidden_size: Optional[int] = None  # default: the dense ffn_hidden_size
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.001
    token_dispatcher: TokenDispatcher = "alltoall"
    # Experts as one grouped GEMM (Transformer Engine's TEGroupedMLP) instead of a loop
    # over experts. None: on with model.transformer_impl=transformer_engine, else off.
    grouped_gemm: Optional[bool] = None
    # The router's weights for a token: softmax over all experts, top-k, then divided by
    # their sum (true: Mixtral, Qwen3-MoE's norm_topk_prob) or kept as they are (false:
    # Qwen1.5/2-MoE). None: true exactly when top_k > 1 (with one expert, renormalising
    # would always give weight 1).
    normalize_top_k: Optional[bool] = None

    @property
    def renormalizes_top_k(self) -> bool:
        return self.top_k > 1 if self.normalize_top_k is None else self.normalize_top_k


@dataclass
class LanguageModelConfig:
    """Llama-style decoder: RMSNorm, SwiGLU, RoPE, optional grouped-query attention.

    Qwen3 is ``qk_norm=true`` (an RMSNorm over each head's queries and keys before RoPE)
    with its own ``head_dim`` (Qwen3-0.6B: 16 heads of 128 in a 1024-wide model)."""

    vocab_size: int = 32000
    hidden_size: int = 3072
    num_layers: int = 28
    num_attention_heads: int = 24
    num_query_groups: Optional[int] = None  # None: multi-head attention
    ffn_hidden_size: int = 8192
    max_sequence_length: int = 4096
    rotary_base: int = 10000
    # Llama-3.x RoPE scaling ("llama3": low_freq_factor 1, high_freq_factor 4, original
    # context 8192, as Megatron-Core implements it) with this factor; None: plain RoPE.
    rope_scaling_factor: Optional[float] = None
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on the query/key/value projection (Qwen2 has them)
    # Width of one attention head (Megatron-Core's kv_channels). None: hidden_size /
    # num_attention_heads.
    head_dim: Optional[int] = None
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


# The linear layers of a transformer layer that LoRA can adapt (vision encoder and decoder;
# MoE experts' linear_fc1/linear_fc2 included). In the connector every torch Linear is.
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoRAConfig:
    """Low-rank adapters (docs/post_training.md). ``rank: 0`` is off."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on each adapter's input, as PEFT
    # Where adapters go; every other weight is frozen, except ``fully_trained`` parts.
    parts: List[ModelPart] = field(default_factory=lambda: ["language_model"])
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # Parts trained in full next to the adapters (LLaVA's recipe trains its projector so).
    fully_trained: List[ModelPart] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class ModelConfig:
    vision: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    # "transformer_engine" needs TE installed; "auto": TE with CUDA, else local.
    transformer_impl: TransformerImpl = "local"
    # per_document: attention per packed document, no s x s mask (flash/fused kernels).
    # dense_mask_reference: the explicit [b, 1, s, s] mask, local only; what tests compare to.
    attention: AttentionKind = "per_document"
    fp8: Optional[FP8Format] = None  # None, "hybrid" or "e4m3"; needs transformer_engine
    # FP8 only where it can run: at start, model.fp8 becomes this format when the resolved
    # transformer_impl is transformer_engine on an FP8 GPU (compute capability 8.9+), and
    # stays null elsewhere (bf16 or fp32). The run's saved config.yaml holds the result.
    fp8_on_gpu: Optional[FP8Format] = None
    fp8_recipe: FP8Recipe = "delayed"  # "delayed" or "current" scaling
    init_method_std: float = 0.02
    # Parts whose parameters are not trained: vision_encoder, connector, language_model.
    freeze: List[ModelPart] = field(default_factory=list)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    # Context parallelism: each rank of a CP group holds 1/CP of every sequence's tokens
    # (chunks r and 2CP-1-r of 2CP equal chunks) for the decoder; see docs/parallelism.md.
    context_parallel_size: int = 1
    # Decoder layers on the first pipeline stage, which also runs the image encoder and
    # connector (None: an even split). The other stages share the rest evenly.
    num_decoder_layers_on_vision_stage: Optional[int] = None
    # Decoder layers on the last stage, which also runs the output layer and loss.
    num_decoder_layers_on_last_stage: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    # Overlap the gradient reduce(-scatter) with the backward pass, and the distributed
    # optimizer's parameter all-gather with the next forward. None: on for GPU runs, off on
    # CPU (gloo gains nothing from it).
    overlap_grad_reduce: Optional[bool] = None
    overlap_param_gather: Optional[bool] = None
    recompute: RecomputeMode = "none"
    launcher: Launcher = "auto"
    # Collectives that wait longer than this fail, so a dead rank ends the job promptly.
    collective_timeout_minutes: float = 30.0


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr_ratio * peak``."""

    lr_rule: LRRule = "mm1"  # "mm1": peak LR from non-embedding params; "fixed": use ``lr``
    lr: Optional[float] = None
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # Multiplies the peak LR of a model part: vision_encoder, connector, language_model.
    lr_multipliers: Dict[ModelPart, float] = field(default_factory=dict)
    # Resuming a checkpoint whose LR schedule (peak, floor, warmup, train_steps, weight
    # decay) differs from this config's: strict stops (exit 2) naming the fields;
    # checkpoint keeps the saved schedule; config uses this one from the saved step.
    schedule_on_resume: ScheduleOnResume = "strict"


@dataclass
class TrainingConfig:
    train_steps: int = 200000
    global_batch_size: int = 512
    micro_batch_size: int = 1
    seq_length: int = 4096
    seed: int = 1234
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # A step whose loss is NaN/Inf is skipped (weights untouched); stop after this many.
    max_nonfinite_steps: int = 3
    # Log a warning when a step's loss exceeds this multiple of the recent average.
    loss_spike_ratio: float = 1.5
    # Fused GPU kernels (SwiGLU, bias-dropout-add, cross-entropy; RoPE with Transformer
    # Engine; weight-gradient accumulation with apex). None: on with CUDA, off on CPU.
    fused_kernels: Optional[bool] = None
    # Where weights are first drawn. cpu: the same weights for every layout (models/
    # seeding.py); gpu: on the device, per tensor-parallel shard (fast, layout-dependent);
    # auto: gpu when the run resumes from a checkpoint (its weights replace them), else cpu.
    init_device: InitDevice = "auto"
    # language_modeling: next-token loss (pre-training, SFT); preference: DPO on
    # preference pairs (the `preference` section, data.mixture {preference: 1}).
    objective: TrainingObjective = "language_modeling"


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = (
        "synthetic"  # synthetic, sentencepiece (a .model) or huggingface (a folder)
    )
    path: Optional[str] = None  # the .model file or tokenizer folder; unset for synthetic


@dataclass
class ImagePipelineConfig:
    """How shard images become pixels (the synthetic world draws its own)."""

    decoder: ImageDecoder = "pil"  # "dali": nvJPEG on GPU, DALI's CPU operators otherwise
    resize: ImageResizeMode = "crop"  # squash, crop (shorter side + centre crop) or pad
    dtype: ImageDtype = "fp32"  # fp32 or bf16 images out of the pipeline
    dali_threads: int = 2  # CPU threads of each DALI pipeline (one per data worker)


@dataclass
class ShardsConfig:
    """``data.source=webdataset``: what each source reads. See docs/data.md."""

    caption: List[str] = field(default_factory=list)  # shard manifests (manifest.json or folder)
    interleaved: List[str] = field(default_factory=list)  # shard manifests
    text: List[str] = field(default_factory=list)  # indexed-dataset prefixes (<prefix>.bin/.idx)
    conversation: List[str] = field(default_factory=list)  # conversation shard manifests
    preference: List[str] = field(default_factory=list)  # preference shard manifests (DPO)


@dataclass
class TilingConfig:
    """High-resolution tiles (``data/pipeline/tiling.py`` has the rules). Each tile goes
    through the vision encoder alone, at ``tile_size`` pixels: the encoder and connector
    read their position tables resized to its patch grid."""

    mode: TilingMode = "none"  # static: MM1's fixed grid; dynamic: MM1.5's per-image grid
    tile_size: int = 672
    static_grid: List[int] = field(default_factory=lambda: [2, 2])  # [cols, rows]
    min_tiles: int = 4  # dynamic grids hold min_tiles..max_tiles sub-images
    max_tiles: int = 9  # MM1.5: 9 in training, 16 at inference
    overview: OverviewPlacement = "after"  # the whole image at tile_size, after the tiles
    max_images_to_split: int = 3  # samples with this many images or more are not split
    min_image_side: int = 16  # image files with a shorter side are skipped (too_small)
    separator: Optional[str] = None  # a single token between the tiles of a split image


@dataclass
class ChatTemplateConfig:
    """Markers of the chat template (``data/shards/conversations.py``); each must be a
    single token of the run's tokenizer. Saved with the run, versioned by ``version``."""

    version: str = "mm1-chat-1"
    system: str = "<system>"
    user: str = "<user>"
    assistant: str = "<assistant>"
    end_of_turn: str = "<end_turn>"


@dataclass
class ConversationConfig:
    # packed: whole conversations fill a sequence (no attention across them);
    # one_per_sequence: one conversation and padding.
    packing: ConversationPacking = "packed"
    # A conversation longer than a sequence: cut after its last whole assistant turn that
    # fits (truncate) or skipped (drop); counted either way, never cut inside an image.
    overlong: OverlongConversation = "truncate"
    chat_template: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)


@dataclass
class BalanceConfig:
    """Which data-parallel rank and micro-batch slot builds each sequence of a global batch
    (``data/pipeline/balance.py``); the global batches themselves never change."""

    # Spread the vision encoder's work (and the decoder's attention) evenly over the
    # data-parallel ranks and micro-batch slots of every step. Off: rank r takes every
    # D-th sequence, as before.
    enabled: bool = True
    # The order of each rank's micro-batches: spread (heavy and light mixed evenly along
    # the schedule), alternate (heaviest, lightest, ...) or heaviest_first
    # (docs/scaling.md compares them on the 1F1B schedule).
    micro_batch_order: MicroBatchOrder = "spread"


@dataclass
class VideoConfig:
    """Videos (docs/video.md): each frame is an image, after a frame-time marker."""

    num_frames: int = 4  # frames per video (the synthetic clips have exactly this many)


@dataclass
class DataConfig:
    source: DataSource = "synthetic"
    # Share of sequences drawn from each source (normalised): MM1's 45/45/10.
    mixture: Dict[str, float] = field(
        default_factory=lambda: {"interleaved": 0.45, "caption": 0.45, "text": 0.10}
    )
    max_images_per_sequence: int = 16
    # Caption shards: sequence k reads samples k*W .. k*W+W-1 and packs those that fit (MM1
    # packs up to 16 image-caption pairs). The synthetic world fills each caption sequence.
    caption_window: int = 16
    # Background processes building micro-batches (0: the training process). None: 2 with
    # CUDA (the GPU must not wait for the host), 0 on CPU (workers would compete for cores).
    num_workers: Optional[int] = None
    prefetch_factor: int = 2  # micro-batches each worker builds ahead
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    images: ImagePipelineConfig = field(default_factory=ImagePipelineConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    conversations: ConversationConfig = field(default_factory=ConversationConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    # Run Python a dataset ships (a Megatron-Energon dataset.yaml's sample_loader or
    # part_filter, from its own .nv-meta folder). Off: such a dataset is refused.
    allow_dataset_code: bool = False


# Keys that moved: a config using the old name is refused with the new one in the message.
MOVED_KEYS: Dict[str, str] = {
    "data.tokenizer": "data.tokenizer.kind",  # when given a value instead of a section
    "data.tokenizer_path": "data.tokenizer.path",
    "data.image_decoder": "data.images.decoder",
    "data.image_resize": "data.images.resize",
    "data.image_dtype": "data.images.dtype",
    "data.caption_shards": "data.shards.caption",
    "data.interleaved_shards": "data.shards.interleaved",
    "data.text_prefixes": "data.shards.text",
}


@dataclass
class ProfileConfig:
    """torch.profiler traces of chosen training steps (docs/profiling.md)."""

    start_step: int = 0  # first traced step (steps count from 1); 0: no profiling
    num_steps: int = 2  # traced steps from start_step on
    ranks: List[int] = field(default_factory=lambda: [0])  # global ranks that trace
    record_shapes: bool = True  # each operator's input shapes
    with_stack: bool = False  # Python stacks per operator (larger traces, slower steps)
    # The CUDA caching allocator's history over the traced steps, as a snapshot for
    # https://pytorch.org/memory_viz (GPU only; CPU runs log that they skip it).
    memory_snapshot: bool = False


@dataclass
class StragglerConfig:
    """Slow-rank detection (docs/profiling.md, "Slow ranks")."""

    interval: int = 0  # steps between reports (each one small all-gather); 0: off
    threshold: float = 1.2  # report ranks whose own work exceeds this x the median
    max_reported: int = 3  # slowest ranks named per report


TrackerMode = Literal["online", "offline"]


@dataclass
class WandbConfig:
    """Weights & Biases (``pip install -e .[wandb]``; docs/trackers.md)."""

    enabled: bool = False
    project: str = "mm1_megatron"
    entity: Optional[str] = None  # team or user; None: the logged-in user's default
    run_name: Optional[str] = None  # None: the name of logging.output_dir
    tags: List[str] = field(default_factory=list)
    mode: TrackerMode = "online"  # offline: written under output_dir, `wandb sync` later


@dataclass
class MlflowConfig:
    """MLflow (``pip install -e .[mlflow]``; docs/trackers.md)."""

    enabled: bool = False
    # None: MLflow's own default (MLFLOW_TRACKING_URI, else its local store); a server
    # (http://...), a database (sqlite:///...) or a folder (file:///...).
    tracking_uri: Optional[str] = None
    experiment: str = "mm1_megatron"
    run_name: Optional[str] = None  # None: the name of logging.output_dir
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class LoggingConfig:
    output_dir: str = "runs/default"
    log_interval: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    # Peak dense bf16 FLOP/s of one device, for MFU. None: H100 SXM on GPU, skip on CPU.
    peak_flops_per_device: Optional[float] = None
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    stragglers: StragglerConfig = field(default_factory=StragglerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (Megatron-Core dist_checkpointing); see docs/checkpoints.md."""

    save_dir: Optional[str] = None
    save_interval: int = 0  # steps between saves; 0: only at the end and on preemption
    # A save folder (newest intact checkpoint, falling back past damaged ones) or one
    # step folder (must be intact). None: resume from save_dir when it has a checkpoint.
    load_dir: Optional[str] = None
    auto_resume: bool = True
    keep_last: int = 3
    keep_every: int = 0  # also keep every step that is a multiple of this (0: none)
    async_save: bool = False
    # "fully_reshardable" loads at any TP/PP/EP/DP layout; "dp_reshardable" writes faster
    # but only reshards across DP.
    optimizer_sharding: OptimizerSharding = "fully_reshardable"
    # Start from pretrained parts (the connector stays freshly initialised).
    pretrained_vision_encoder: Optional[str] = None
    pretrained_language_model: Optional[str] = None
    # Start a fresh run from a whole MM1 checkpoint's model weights (saved at any layout),
    # with a new optimizer, schedule and data position: pre-training -> SFT. Not read when
    # the run resumes from its own checkpoints.
    initial_weights: Optional[str] = None


@dataclass
class EvalConfig:
    """Few-shot evaluation, the same for ``mm1 eval`` and evaluation during training (both
    build one ``evaluation.plan.EvalPlan`` from it), and the held-out loss of training.
    See docs/evaluation.md."""

    interval: int = 0  # every N steps and after the last one (0: never)
    # Held-out loss per source over this many micro-batches per data-parallel rank: a
    # synthetic stream the run never trains on, or heldout_shards for webdataset runs.
    heldout_batches: int = 4
    heldout_shards: ShardsConfig = field(default_factory=ShardsConfig)
    tasks: List[str] = field(default_factory=list)  # few-shot tasks, e.g. [synthetic_vqa]
    shots: List[int] = field(default_factory=lambda: [0])
    limit: Optional[int] = 16  # a fixed, seeded subset of each task; null: every example
    task_paths: Optional[str] = None  # the dataset files YAML of the official tasks
    batch_size: int = 8  # prompts per generation batch (per data-parallel rank)
    # The subset and demonstration draw; null: training.seed (what evaluation during
    # training has always used, so `mm1 eval` of a checkpoint sees the examples its run saw).
    seed: Optional[int] = None
    demo_selection: DemoSelection = "random"  # or "similar": by image similarity (RICES)
    text_demos_at_zero: bool = False  # 0-shot prompts carry two text-only demonstrations
    num_beams: Optional[int] = None  # None: per task (3 for COCO/VQA, 1 synthetic)
    max_new_tokens: Optional[int] = None  # None: per task (20 captions, 5 VQA)
    vqa_mode: VQAMode = "official"  # answer normalisation: official or openflamingo
    # A missing image or malformed annotation: stop before generating, or skip and count.
    on_bad: OnBadEntry = "stop"


@dataclass
class PreferenceConfig:
    """DPO (``training.objective=preference``); see docs/post_training.md."""

    beta: float = 0.1  # the reward scale: r(y) = beta * log(pi(y|x) / pi_ref(y|x))
    loss: PreferenceLoss = "sigmoid"  # sigmoid (DPO) or ipo
    label_smoothing: float = 0.0  # sigmoid only: conservative DPO's assumed label noise
    # Plus this times the chosen answer's mean token NLL (RPO); 0: DPO alone.
    nll_weight: float = 0.0


@dataclass
class MM1Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
