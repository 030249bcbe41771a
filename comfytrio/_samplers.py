"""Reading an API-format workflow for a batch split: which nodes sample a latent, with
which sampler and seeds, which nodes a latent feeds, and which of ComfyUI's samplers make
each image from its own starting noise alone. Read-only: it never edits a workflow.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ._workflow import title_of
from .hookspecs import Param

__all__ = [
    "DETERMINISTIC_SAMPLERS",
    "LATENT_BATCHES",
    "STOCHASTIC_SAMPLERS",
    "WorkflowGraph",
    "is_stochastic",
    "link_from",
]

STOCHASTIC_SAMPLERS = frozenset(
    {
        "euler_ancestral",
        "euler_ancestral_cfg_pp",
        "dpm_2_ancestral",
        "dpmpp_2s_ancestral",
        "dpmpp_2s_ancestral_cfg_pp",
        "dpmpp_sde",
        "dpmpp_sde_gpu",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_gpu",
        "dpmpp_2m_sde_heun",
        "dpmpp_2m_sde_heun_gpu",
        "dpmpp_3m_sde",
        "dpmpp_3m_sde_gpu",
        "ddpm",
        "lcm",
        "res_multistep_ancestral",
        "res_multistep_ancestral_cfg_pp",
        "er_sde",
        "seeds_2",
        "seeds_3",
        "sa_solver",
        "sa_solver_pece",
    }
)
"""ComfyUI 0.3.64's samplers that draw fresh noise for the whole batch at every step
(ancestral, SDE, LCM, stochastic Adams): a shard of the batch makes other images."""

DETERMINISTIC_SAMPLERS = frozenset(
    {
        "euler",
        "euler_cfg_pp",
        "heun",
        "heunpp2",
        "dpm_2",
        "lms",
        "dpm_fast",
        "dpm_adaptive",
        "dpmpp_2m",
        "dpmpp_2m_cfg_pp",
        "ipndm",
        "ipndm_v",
        "deis",
        "res_multistep",
        "res_multistep_cfg_pp",
        "gradient_estimation",
        "gradient_estimation_cfg_pp",
        "ddim",
        "uni_pc",
        "uni_pc_bh2",
    }
)
"""ComfyUI 0.3.64's samplers that draw no noise after the first (as they are set by
``KSampler``): each image depends only on its own starting noise."""

LATENT_BATCHES = {"EmptyLatentImage": 4, "EmptySD3LatentImage": 16}
"""The empty-latent nodes whose ``batch_size`` a split can cut, with their channels."""

_SEED_INPUTS = ("seed", "noise_seed")
_STOCHASTIC_WORDS = ("ancestral", "sde", "lcm", "sasolver", "sa_solver")


def is_stochastic(name: str | None) -> bool:
    """Whether a sampler (a ``sampler_name``, or a sampler node's class) draws noise while it
    samples: one of ``STOCHASTIC_SAMPLERS``, or named like one (a custom node's)."""
    return name is not None and (
        name in STOCHASTIC_SAMPLERS or any(w in name.lower() for w in _STOCHASTIC_WORDS)
    )


def link_from(value: object) -> str | None:
    """The node id a link ``[id, slot]`` comes from (None for a plain value)."""
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
    ):
        return str(value[0])
    return None


class WorkflowGraph:
    """Read-only questions about an API-format workflow's nodes and links."""

    def __init__(self, workflow: Mapping[str, Any]) -> None:
        self.nodes: dict[str, Mapping[str, Any]] = {
            str(k): v for k, v in workflow.items() if isinstance(v, Mapping)
        }
        self._consumers: dict[str, list[tuple[str, str]]] = {}
        for node_id in self.nodes:
            for name, value in self.inputs(node_id).items():
                source = link_from(value)
                if source is not None:
                    self._consumers.setdefault(source, []).append((node_id, str(name)))

    def inputs(self, node_id: str) -> Mapping[str, Any]:
        inputs = self.nodes.get(node_id, {}).get("inputs")
        return inputs if isinstance(inputs, Mapping) else {}

    def input(self, node_id: str, name: str) -> Any:
        return self.inputs(node_id).get(name)

    def class_type(self, node_id: str) -> str | None:
        value = self.nodes.get(node_id, {}).get("class_type")
        return value if isinstance(value, str) else None

    def title(self, node_id: str) -> str | None:
        return title_of(self.nodes[node_id]) if node_id in self.nodes else None

    def label(self, node_id: str) -> str:
        """How reports name a node: its title when no other node has it, else class and id."""
        title = self.title(node_id)
        if title is not None and sum(self.title(n) == title for n in self.nodes) == 1:
            return title
        return f"{title or self.class_type(node_id)} (id {node_id})"

    def targets(self, param: Param) -> Iterator[tuple[str, str]]:
        """(node id, input) of every value ``param`` sets: the inputs it writes, or, where
        it writes a node's ``value`` (a primitive), every input that node feeds."""
        for node_id in param.node_ids:
            written = param.inputs.get(node_id)
            if written is not None and written != "value":
                yield node_id, written
                continue
            consumers = self._consumers.get(node_id, [])
            if not consumers:
                yield node_id, written or "value"
            yield from consumers

    def consumers(self, node_id: str) -> list[tuple[str, str]]:
        """(node, input) of every input linked from ``node_id``."""
        return self._consumers.get(node_id, [])

    def downstream(self, start: str) -> set[str]:
        """Every node fed, through any path of links, by ``start``."""
        seen: set[str] = set()
        todo = [start]
        while todo:
            for consumer, _ in self._consumers.get(todo.pop(), []):
                if consumer not in seen:
                    seen.add(consumer)
                    todo.append(consumer)
        return seen

    def samples(self, node_id: str) -> bool:
        """Whether the node samples a latent (KSampler, SamplerCustom...): it takes one
        (``latent_image``) and noise (a seed, or a ``noise`` link)."""
        inputs = self.inputs(node_id)
        return "latent_image" in inputs and (
            "noise" in inputs or any(name in inputs for name in _SEED_INPUTS)
        )

    def seed_inputs_of(self, node_id: str) -> list[str]:
        return [name for name in _SEED_INPUTS if name in self.inputs(node_id)]

    def seed_inputs(self, sampler_id: str) -> list[tuple[str, str]]:
        """(node, input) holding the seed a sampler's noise is drawn with: its own
        ``seed``/``noise_seed``, or those of the node its ``noise`` input comes from
        (``RandomNoise``)."""
        own = [(sampler_id, name) for name in self.seed_inputs_of(sampler_id)]
        noise = link_from(self.input(sampler_id, "noise"))
        if noise is not None:
            own += [(noise, name) for name in self.seed_inputs_of(noise)]
        return own

    def sampler_name(self, sampler_id: str) -> str | None:
        """The sampler a sampling node uses: its ``sampler_name``, or that of the node its
        ``sampler`` input comes from (``KSamplerSelect``), or that node's class (a
        ``SamplerEulerAncestral``); None when it cannot be read."""
        for node_id in (sampler_id, link_from(self.input(sampler_id, "sampler"))):
            if node_id is None:
                continue
            value = self.input(node_id, "sampler_name")
            source = link_from(value)
            if source is not None:
                value = self.input(source, "value")
                value = value if value is not None else self.input(source, "sampler_name")
            if isinstance(value, str):
                return value
            if node_id != sampler_id:
                return self.class_type(node_id)
        return None

    def int_value(self, value: Any) -> int | None:
        """A literal int, or the literal ``value`` of the node a link comes from."""
        source = link_from(value)
        if source is not None:
            value = self.input(source, "value")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return None

    def seed_holders(
        self, samplers: Sequence[str], params: Sequence[Param], seed_params: frozenset[str]
    ) -> list[tuple[str, str]]:
        """(node, input) of each seed of ``samplers`` that no param sets, directly or
        through the node it is linked from."""
        written: set[tuple[str, str]] = set()  # (node, input) a param writes
        chosen: set[str] = set()  # nodes a ``seed`` param writes by title (it picks the input)
        for param in params:
            for node_id in param.node_ids:
                target = param.inputs.get(node_id)
                if target is None and param.name in seed_params:
                    chosen.add(node_id)
                else:
                    written.add((node_id, target or "value"))
        sources = chosen | {node_id for node_id, _ in written}
        holders: list[tuple[str, str]] = []
        for sampler_id in samplers:
            for node_id, name in self.seed_inputs(sampler_id):
                source = link_from(self.input(node_id, name))
                set_by_job = (
                    (node_id, name) in written
                    or node_id in chosen
                    or (source is not None and source in sources)
                )
                if not set_by_job and (node_id, name) not in holders:
                    holders.append((node_id, name))
        return holders

    def noise_aligned(self, latent_id: str) -> bool:
        """Whether torch draws a sample's noise alike in the whole batch and alone: one sample
        of the latent holds a multiple of 16 values (known only for literal sizes)."""
        channels = LATENT_BATCHES.get(self.class_type(latent_id) or "", 4)
        width = self.int_value(self.input(latent_id, "width"))
        height = self.int_value(self.input(latent_id, "height"))
        if channels % 16 == 0:
            return True
        if width is None or height is None:
            return False
        return (channels * (width // 8) * (height // 8)) % 16 == 0
