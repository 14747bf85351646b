"""gRPC workers: smg as the full OpenAI server in front of an engine that only schedules
tokens (SGLang `sglang.grpc.scheduler.SglangScheduler`, vLLM `vllm.grpc.engine.VllmEngine`).

`types` is the backend-neutral vocabulary every stage speaks; only `client` and `protos`
import grpcio and the `smg-grpc-proto` stubs, and only after the fork.
"""
