"""locust load for the soak test (tests/test_serving_soak.py): every user posts the same V2
request to ``SOAK_MODEL`` back to back over keep-alive connections."""

import os

from locust import FastHttpUser, constant, task

BODY = open(os.environ["SOAK_BODY"], "rb").read()  # noqa: SIM115 - read once at import
PATH = f"/v2/models/{os.environ.get('SOAK_MODEL', 'digits_mlp')}/infer"


class InferUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def infer(self) -> None:
        self.client.post(PATH, data=BODY, headers={"Content-Type": "application/json"})
