"""``MM1Processor``: prompt text and images -> ``input_ids`` and tiles, as training built them.

The image processor cuts each image into tiles (``MM1ImageProcessor``, for a run that
tiles its images; any other gives one tile per image: ``CLIPImageProcessor``, or
``Siglip2ImageProcessor`` for a native-resolution tower, whose ``pixel_attention_mask``
and ``spatial_shapes`` are passed on next to its ``pixel_values``); every ``<image>``
marker of the text, in order, then becomes ``num_tiles x num_image_tokens`` image tokens
(one placeholder per tile, each expanded to the connector's token count), and the text
is tokenized without adding special tokens: a prompt written by the chat template
already starts with bos::

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=text, images=[image], return_tensors="pt")
    model.generate(**batch, max_new_tokens=64)

``images`` are the images of the prompt in marker order (or, for a batch of prompts, one
list per prompt, or one flat list in marker order across them); a prompt's images are
tiled together, since a sample with ``max_images_to_split`` images or more is not split.
The output is a ``BatchFeature``, as ``transformers``' ``image-text-to-text`` pipeline and
``processor.apply_chat_template(messages, tokenize=True, return_dict=True)`` need.

Videos are their frames, as training saw them (docs/video.md): each ``<video>`` marker of
the text takes the next of ``videos`` (its frames: a list of images, or one ``[T, 3, H,
W]`` tensor) and becomes a time marker and an image marker per frame, ``time 1.5 :
<image> time 2.5 : <image> ...``, at ``video_timestamps`` (seconds per frame; default
one frame per second from 0). A model trained on the synthetic world writes whole
seconds as its words (``frame_time_words``: ``time two :``)::

    batch = processor(text="<video> what happens ?", videos=[frames],
                      video_timestamps=[[0.5, 1.5, 2.5, 3.5]], return_tensors="pt")

This file travels with every exported MM1 model and is loaded with ``trust_remote_code``:
it imports only the standard library, torch and transformers.
"""

from __future__ import annotations

from typing import List

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin


def _per_prompt(images, markers: List[int]) -> List[list]:
    """Split ``images`` into one list per prompt, checking the marker counts."""
    if images is None:
        images = []
    elif hasattr(images, "dim") and images.dim() == 4:  # a [n, 3, H, W] tensor
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    nested = len(images) > 0 and all(isinstance(item, (list, tuple)) for item in images)
    if nested:
        if len(images) != len(markers):
            raise ValueError(
                f"images has {len(images)} lists for {len(markers)} prompts; give one list "
                "of images per prompt, or one flat list in marker order"
            )
        groups = [list(group) for group in images]
    else:
        if len(images) != sum(markers):
            raise ValueError(
                f"the text has {sum(markers)} image markers but {len(images)} images were "
                "given; each image needs one marker, in order"
            )
        starts = [sum(markers[:index]) for index in range(len(markers))]
        groups = [list(images[start : start + n]) for start, n in zip(starts, markers)]
    for index, (group, count) in enumerate(zip(groups, markers)):
        if len(group) != count:
            raise ValueError(
                f"prompt {index} has {count} image markers but {len(group)} images; each "
                "image needs one marker, in order"
            )
    return groups


class MM1Processor(ProcessorMixin):
    """An image processor plus the tokenizer; expands image markers as training did."""

    # As transformers marks a class loaded with trust_remote_code: save_pretrained() then
    # writes this file next to the config and names it in auto_map.
    _auto_class = "AutoProcessor"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 144,
        image_token: str = "<image>",
        tile_separator=None,
        chat_template=None,
        video_token: str = "<video>",
        frame_time_words=None,
    ):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens} must be >= 1")
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.tile_separator = tile_separator or ""  # between the tiles of one image
        self.video_token = video_token
        self.frame_time_words = list(frame_time_words) if frame_time_words else None
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def __call__(
        self,
        images=None,
        text=None,
        videos=None,
        audio=None,
        return_tensors=None,
        video_timestamps=None,
        **kwargs,
    ) -> BatchFeature:
        """``input_ids`` / ``attention_mask`` of ``text`` with its image (and video)
        markers expanded, plus, when there are images or frames, the image processor's
        outputs (``pixel_values`` ``[num_tiles, 3, T, T]``; native resolution:
        ``pixel_values`` ``[n, max_patches, c*p*p]``, ``pixel_attention_mask``,
        ``spatial_shapes``) and ``num_tiles`` per image. Other keywords (``padding``,
        ...) go to the tokenizer."""
        if text is None:
            raise ValueError("MM1Processor needs text with one image marker per image")
        if audio is not None:
            raise ValueError("MM1 models read images, videos and text, not audio")
        prompts = [text] if isinstance(text, str) else list(text)
        markers = [prompt.count(self.image_token) for prompt in prompts]
        groups = _per_prompt(images, markers)
        if videos is not None or any(self.video_token in prompt for prompt in prompts):
            prompts, groups = self._place_videos(prompts, groups, videos, video_timestamps)
            markers = [prompt.count(self.image_token) for prompt in prompts]
        kwargs.setdefault("add_special_tokens", False)  # the chat template writes bos
        images_out = {}
        if sum(markers) > 0:
            images_out = self._tiles(groups)
            prompts = self._expand_markers(prompts, images_out["num_tiles"].tolist())
        encoding = self.tokenizer(
            prompts[0] if isinstance(text, str) else prompts,
            return_tensors=return_tensors,
            **kwargs,
        )
        return BatchFeature(data={**encoding, **images_out}, tensor_type=return_tensors)

    def frame_marker(self, seconds: float) -> str:
        """What stands before a frame ``seconds`` into its video, as training wrote it."""
        if self.frame_time_words is None:
            return f"time {round(float(seconds), 1):g} :"
        whole = int(round(float(seconds)))
        if whole != float(seconds) or not 0 <= whole < len(self.frame_time_words):
            raise ValueError(
                f"video_timestamps: this model's frame markers are whole seconds 0 to "
                f"{len(self.frame_time_words) - 1} (its training words), not {seconds}"
            )
        return f"time {self.frame_time_words[whole]} :"

    def _place_videos(self, prompts, groups, videos, timestamps):
        """Each ``<video>`` marker as its frames' markers; the frames join the prompt's
        images where the marker stood."""
        videos = [] if videos is None else list(videos)
        wanted = sum(prompt.count(self.video_token) for prompt in prompts)
        if len(videos) != wanted:
            raise ValueError(
                f"the text has {wanted} {self.video_token} markers but {len(videos)} videos "
                "were given; each video needs one marker, in order"
            )
        times = [None] * len(videos) if timestamps is None else list(timestamps)
        if len(times) != len(videos):
            raise ValueError(f"video_timestamps has {len(times)} lists for {len(videos)} videos")
        clips = iter(zip(videos, times))
        out_prompts, out_groups = [], []
        for prompt, group in zip(prompts, groups):
            images, text, merged = iter(group), [], []
            for index, piece in enumerate(prompt.split(self.video_token)):
                if index > 0:
                    frames, seconds = next(clips)
                    frames = list(frames)
                    seconds = range(len(frames)) if seconds is None else list(seconds)
                    if len(seconds) != len(frames) or not frames:
                        raise ValueError(
                            f"a video has {len(frames)} frames and {len(seconds)} timestamps"
                        )
                    text.append(
                        " ".join(f"{self.frame_marker(t)} {self.image_token}" for t in seconds)
                    )
                    merged += frames
                text.append(piece)
                merged += [next(images) for _ in range(piece.count(self.image_token))]
            out_prompts.append("".join(text))
            out_groups.append(merged)
        return out_prompts, out_groups

    def _tiles(self, groups: List[list]) -> dict:
        """The image processor's outputs and ``num_tiles``, for one image list per prompt."""
        pixels = self.image_processor(groups, return_tensors="pt")
        if "num_tiles" in pixels:
            return {"pixel_values": pixels["pixel_values"], "num_tiles": pixels["num_tiles"]}
        # An image processor that does not tile (a run without data.tiling): one each.
        # Its other outputs (Siglip2's mask and spatial shapes) are the model's too.
        num_images = sum(len(group) for group in groups)
        if pixels["pixel_values"].shape[0] != num_images:
            raise ValueError(
                f"{type(self.image_processor).__name__} gave "
                f"{pixels['pixel_values'].shape[0]} pixel tensors for {num_images} images"
            )
        num_tiles = torch.ones(num_images, dtype=torch.long)
        return {**pixels, "num_tiles": num_tiles}

    def _expand_markers(self, prompts: List[str], num_tiles: List[int]) -> List[str]:
        """Each marker, in order, as its image's tiles of ``num_image_tokens`` tokens."""
        tile = self.image_token * self.num_image_tokens
        counts = iter(num_tiles)
        expanded = []
        for prompt in prompts:
            pieces = prompt.split(self.image_token)
            out = [pieces[0]]
            for piece in pieces[1:]:
                out += [self.tile_separator.join([tile] * next(counts)), piece]
            expanded.append("".join(out))
        return expanded

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        names = [
            *self.tokenizer.model_input_names,
            *getattr(self.image_processor, "model_input_names", ["pixel_values"]),
            "num_tiles",
        ]
        return list(dict.fromkeys(names))  # in order, once each
