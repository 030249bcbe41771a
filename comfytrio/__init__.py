"""comfytrio: run ComfyUI workflows across many ComfyUI servers at once, with trio.

The public names are re-exported here; every module whose name starts with ``_`` is private.
"""

from __future__ import annotations

import logging

from ._api import ComfyAPI as ComfyAPI
from ._api import WorkflowOptions as WorkflowOptions
from ._check import WorkflowProblem as WorkflowProblem
from ._client import ComfyClient as ComfyClient
from ._client import connect_comfy_client as connect_comfy_client
from ._client import open_comfy_client as open_comfy_client
from ._dry_run import CheckReport as CheckReport
from ._dry_run import PlannedShard as PlannedShard
from ._errors import BrokerError as BrokerError
from ._errors import BrokerUnavailableError as BrokerUnavailableError
from ._errors import ComfyAPIError as ComfyAPIError
from ._errors import ComfyUIStartupError as ComfyUIStartupError
from ._errors import ComfyUITimeoutError as ComfyUITimeoutError
from ._errors import DownloadError as DownloadError
from ._errors import ExecutionError as ExecutionError
from ._errors import ExecutionInterruptedError as ExecutionInterruptedError
from ._errors import GPUDetectionError as GPUDetectionError
from ._errors import IdempotencyKeyReusedError as IdempotencyKeyReusedError
from ._errors import JobNotFoundError as JobNotFoundError
from ._errors import ModelNotFoundError as ModelNotFoundError
from ._errors import NodeInputNotFoundError as NodeInputNotFoundError
from ._errors import NodeTitleNotFoundError as NodeTitleNotFoundError
from ._errors import NoInstanceReadyError as NoInstanceReadyError
from ._errors import NotReproducibleError as NotReproducibleError
from ._errors import ParamError as ParamError
from ._errors import PluginError as PluginError
from ._errors import PortInUseError as PortInUseError
from ._errors import PromptVanishedError as PromptVanishedError
from ._errors import ServerError as ServerError
from ._errors import ServerLostError as ServerLostError
from ._errors import ServerProtocolError as ServerProtocolError
from ._errors import UnknownParamTypeError as UnknownParamTypeError
from ._errors import UnsafeNameError as UnsafeNameError
from ._errors import WorkflowError as WorkflowError
from ._events import ComfyEvent as ComfyEvent
from ._events import NodeActivity as NodeActivity
from ._events import NodeOutput as NodeOutput
from ._events import NodePreview as NodePreview
from ._events import NodeProgress as NodeProgress
from ._events import NodesCached as NodesCached
from ._events import NodeStarted as NodeStarted
from ._events import NodeText as NodeText
from ._events import PromptFinished as PromptFinished
from ._events import PromptStarted as PromptStarted
from ._events import QueueStatus as QueueStatus
from ._http import HttpClient as HttpClient
from ._instance import InstanceState as InstanceState
from ._job_events import JobEvent as JobEvent
from ._job_events import JobPlanned as JobPlanned
from ._job_events import ShardFailed as ShardFailed
from ._job_events import ShardFinished as ShardFinished
from ._job_events import ShardSubmitted as ShardSubmitted
from ._jobs import ShardOutputs as ShardOutputs
from ._plan import JobPlan as JobPlan
from ._plan import ShardPlan as ShardPlan
from ._plan import plan_job as plan_job
from ._plan import validate_params as validate_params
from ._plugins import PluginEntry as PluginEntry
from ._plugins import Plugins as Plugins
from ._plugins import make_plugin_manager as make_plugin_manager
from ._rest import wait_server_ready as wait_server_ready
from ._results import ClientStatistics as ClientStatistics
from ._results import OutputRef as OutputRef
from ._results import PromptResult as PromptResult
from ._results import StreamedImage as StreamedImage
from ._results import SubmittedPrompt as SubmittedPrompt
from ._scheduler import ApiStatistics as ApiStatistics
from ._scheduler import InstanceStatistics as InstanceStatistics
from ._scheduler import JobStatistics as JobStatistics
from ._scheduler import distribute as distribute
from ._shards import PROMPT_NAMESPACE as PROMPT_NAMESPACE
from ._shards import shard_prompt_id as shard_prompt_id
from ._types import ComfyUIInstance as ComfyUIInstance
from ._types import FaultPolicy as FaultPolicy
from ._types import GPUInfo as GPUInfo
from ._types import JobResult as JobResult
from ._types import LoRARef as LoRARef
from ._types import ModelRef as ModelRef
from ._types import OutputFile as OutputFile
from ._types import OutputValue as OutputValue
from ._types import RemoteComfyUI as RemoteComfyUI
from ._types import ShardFailure as ShardFailure
from ._types import ShardReport as ShardReport
from .hookspecs import hookimpl as hookimpl

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
