"""What `RealModalClient.get` and `.cancel` make of each answer Modal can give.

Modal's own `FunctionCall.from_id(...).get()` runs for real here, with its
output polling (`_Invocation.poll_function`) and its result decoding
(`_process_result`); only the gRPC stub under it is replaced, answering with
what Modal's server sends (a `FunctionGetOutputsResponse`) or raising what
modal's gRPC layer raises after its own retries. The answers and the lines of
modal 1.6.4 they come from are listed in docs/modal.md.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import modal
import pytest
from modal import exception as mx
from modal._serialization import serialize
from modal.client import _Client
from modal_proto import api_pb2

from clipexport.backends.modal import (
    CallCancelled,
    CallExpired,
    CallFailed,
    CallRunning,
    CallTimedOut,
    ModalBusy,
    ModalUnreachable,
    RealModalClient,
)
from clipexport.errors import RemoteFailure
from clipexport.remote import contained

Result = api_pb2.GenericResult


class Stub:
    """The control-plane stub: one scripted answer (a response or an exception) for every request."""

    def __init__(self) -> None:
        self.answer: object = None
        self.requests: list[object] = []

    async def FunctionGetOutputs(self, request, **_):  # noqa: N802
        self.requests.append(request)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def FunctionCallCancel(self, request, **_):  # noqa: N802
        self.requests.append(request)


@pytest.fixture
def stub():
    client = _Client("https://modal.invalid", api_pb2.CLIENT_TYPE_CLIENT, ("ak-test", "as-test"))
    client._control_plane_stub = Stub()
    _Client._set_env_client(client)
    yield client._control_plane_stub
    _Client._set_env_client(None)


@pytest.fixture
def client():
    return RealModalClient(modal=SimpleNamespace(FunctionCall=modal.FunctionCall, Cls=None, exception=mx))


def output(status: int, *, data: object = None, exception: str = "") -> api_pb2.FunctionGetOutputsResponse:
    result = Result(status=status, exception=exception)
    if data is not None:
        result.data = serialize(data)
    item = api_pb2.FunctionGetOutputsItem(result=result, data_format=api_pb2.DATA_FORMAT_PICKLE)
    return api_pb2.FunctionGetOutputsResponse(outputs=[item])


def raised_in_container(exc: BaseException) -> api_pb2.FunctionGetOutputsResponse:
    return output(Result.GENERIC_STATUS_FAILURE, data=exc, exception=repr(exc))


def test_a_result_is_returned(stub, client):
    stub.answer = output(Result.GENERIC_STATUS_SUCCESS, data={"segments": [{"part": "seg-0001"}]})
    assert client.get("fc-1", timeout=0) == {"segments": [{"part": "seg-0001"}]}
    assert stub.requests[0].function_call_id == "fc-1" and stub.requests[0].timeout == 0


def test_no_output_yet_is_running(stub, client):
    stub.answer = api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=1)
    with pytest.raises(CallRunning):
        client.get("fc-1", timeout=0)


def test_no_output_and_nothing_unfinished_is_expired(stub, client):
    stub.answer = api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=0)
    with pytest.raises(CallExpired, match="expired"):
        client.get("fc-1", timeout=0)


def test_an_unknown_call_is_expired(stub, client):
    stub.answer = mx.NotFoundError("Function call fc-1 not found")
    with pytest.raises(CallExpired, match="does not know"):
        client.get("fc-1", timeout=0)


@pytest.mark.parametrize(
    ("inside", "says"),
    [
        (TimeoutError("The read operation timed out"), "TimeoutError: The read operation timed out"),
        (OSError(28, "No space left on device"), "No space left on device"),
        (ConnectionResetError(104, "Connection reset by peer"), "Connection reset by peer"),
        (ValueError("bad frame"), "ValueError: bad frame"),
    ],
)
def test_a_builtin_exception_from_an_unwrapped_container_is_a_failure(stub, client, inside, says):
    """An older deployment let builtins out: a TimeoutError with arguments or an OSError is the call's failure."""
    stub.answer = raised_in_container(inside)
    with pytest.raises(CallFailed, match=says) as failed:
        client.get("fc-1", timeout=0)
    assert type(failed.value) is CallFailed and failed.value.resumable


@pytest.mark.parametrize("inside", [TimeoutError(), TimeoutError("read timed out"), OSError(28, "No space")])
def test_the_container_wraps_builtins_and_the_client_reads_a_failure(stub, client, inside):
    with pytest.raises(RemoteFailure) as wrapped:
        with contained():
            raise inside
    assert wrapped.value.kind == type(inside).__name__
    again = pickle.loads(pickle.dumps(wrapped.value))  # what Modal carries back
    assert (again.kind, again.detail, str(again)) == (wrapped.value.kind, wrapped.value.detail, str(wrapped.value))
    stub.answer = raised_in_container(wrapped.value)
    with pytest.raises(CallFailed, match=type(inside).__name__) as failed:
        client.get("fc-1", timeout=0)
    assert failed.value.resumable


def test_a_clipexport_error_raised_in_a_container_keeps_its_resumability(stub, client):
    from clipexport.errors import StorageAuthError

    stub.answer = raised_in_container(StorageAuthError("the store rejected the credentials"))
    with pytest.raises(CallFailed, match="rejected") as failed:
        client.get("fc-1", timeout=0)
    assert failed.value.resumable is False


def test_past_its_time_limit_is_timed_out(stub, client):
    stub.answer = output(Result.GENERIC_STATUS_TIMEOUT, exception="Function call timed out after 1800s")
    with pytest.raises(CallTimedOut, match="time limit"):
        client.get("fc-1", timeout=0)


def test_a_cancelled_call_is_cancelled(stub, client):
    stub.answer = output(Result.GENERIC_STATUS_TERMINATED)  # no data, no message: RemoteError('')
    with pytest.raises(CallCancelled):
        client.get("fc-1", timeout=0)


def test_an_internal_failure_is_a_failure(stub, client):
    stub.answer = output(Result.GENERIC_STATUS_INTERNAL_FAILURE, exception="worker died")
    with pytest.raises(CallFailed, match="InternalFailure: worker died") as failed:
        client.get("fc-1", timeout=0)
    assert type(failed.value) is CallFailed


@pytest.mark.parametrize("exc", [mx.ServiceError("UNAVAILABLE"), mx.InternalError("INTERNAL"),
                                 mx.ResourceExhaustedError("slow down"), mx.ClientClosed("closed")])
def test_transport_errors_say_ask_again_later(stub, client, exc):
    stub.answer = exc
    with pytest.raises(ModalBusy) as busy:
        client.get("fc-1", timeout=0)
    assert type(busy.value) is ModalBusy and busy.value.resumable


def test_only_modals_connection_error_means_unreachable(stub, client):
    stub.answer = mx.ConnectionError("Could not connect to the Modal server.")
    with pytest.raises(ModalUnreachable, match="cannot reach Modal"):
        client.get("fc-1", timeout=0)


def test_cancel_terminates_the_containers(stub, client):
    client.cancel("fc-9")
    (request,) = stub.requests
    assert request.function_call_id == "fc-9" and request.terminate_containers is True
