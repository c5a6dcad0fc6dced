"""The route table's matcher: path templates, the optional version, 404 and 405."""

import pytest

from handlers.routes import match
from runtime.errors import MethodNotAllowed, NotFound


@pytest.mark.parametrize("method,path,view,params", [
    ("GET", "/v2", "server_metadata", {}),
    ("GET", "/v2/", "server_metadata", {}),
    ("HEAD", "/v2/health/ready", "health_ready", {}),
    ("GET", "/v2/models/stats", "model_stats", {}),
    ("GET", "/v2/models/stats/stats", "model_stats", {"model": "stats"}),
    ("GET", "/v2/models/m", "model_metadata", {"model": "m"}),
    ("GET", "/v2/models/m/versions/3", "model_metadata", {"model": "m", "version": "3"}),
    ("GET", "/v2/models/m/versions/ready", "model_metadata", {"model": "m", "version": "ready"}),
    ("GET", "/v2/models/m/ready/", "model_ready", {"model": "m"}),
    ("POST", "/v2/models/m/versions/2/infer", "infer", {"model": "m", "version": "2"}),
    ("POST", "/v2/models/m/generate_stream", "generate_stream", {"model": "m"}),
    ("GET", "/v1/models/m", "openai_model", {"model": "m"}),
    ("PUT", "/v2/shardserve/registry/nodes/n1", "register_node", {"node": "n1"}),
])
def test_paths_reach_their_view_with_their_parameters(method, path, view, params):
    route, found = match(method, path)
    assert (route.view.__name__, found) == (view, params)


@pytest.mark.parametrize("path", ["", "/", "//v2", "/v2//", "/v2/models//infer",
                                  "/v2/models/m//infer", "/v2/models/m/versions//infer",
                                  "/v2/models/m/infer/extra", "/v3/models/m/infer"])
def test_unknown_paths_are_404(path):
    with pytest.raises(NotFound):
        match("POST", path)


def test_a_known_path_with_another_method_is_405():
    with pytest.raises(MethodNotAllowed):
        match("GET", "/v2/models/m/infer")
    with pytest.raises(MethodNotAllowed):
        match("DELETE", "/v2/health/live")
