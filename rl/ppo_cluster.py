"""PPO on a Ray cluster: GRPO's ClusterRun (rl/grpo_cluster.py) with a critic worker group and PPOTrainer.

Roles: GRPO's (policy, reference, generation engines, reward model) plus `critic`, a CriticWorker group
laid out as `parallel` like the policy (tp x pp x dp ranks; rl/workers/critic.py). Colocated, every role
shares the one pool; disaggregated, the critic shares the policy's pool (as the reference and the reward
model do) unless placement.pools gives it its own (`pools: {policy: 1, generation: 1, critic: 1}`). A
verifier plus a weighted reward model (environment.reward_model) scores through a RewardModelWorker group,
as environment.name=reward_model does. Failures and restarts are GRPO's: a restart rebuilds the critic
group too and the trainer resumes policy, critic and beta from the newest checkpoint.
"""

from __future__ import annotations

import dataclasses

from algorithms.grpo import Inputs
from algorithms.ppo import PPOComponents, PPOConfig, PPOTrainer
from rl.cluster.placement import RolePlacement
from rl.grpo_cluster import ClusterRun, run_rl_any


class PPOClusterRun(ClusterRun):
    """One PPO run on Ray (see the module docstring); start / run / shutdown as ClusterRun."""

    trainer_cls = PPOTrainer
    layout_roles = ("policy", "reference", "critic")
    guest_roles = ("reference", "reward_model", "critic")

    def _check(self) -> Inputs:
        from algorithms.ppo import check_for_run

        return check_for_run(self.cfg)

    def _roles(self) -> list[str]:
        roles = super()._roles()
        if self.cfg.environment.uses_reward_model and "reward_model" not in roles:
            roles.append("reward_model")
        return [*roles, "critic"]

    def _build_groups(self, placed: dict[str, RolePlacement]) -> None:
        from algorithms.ppo import critic_source
        from rl.workers import CriticSpec, CriticWorker

        super()._build_groups(placed)
        cfg = self.cfg
        spec = CriticSpec(
            init_from=str(critic_source(cfg)),
            parallel=cfg.parallel,
            loss=cfg.critic.loss,
            optim=cfg.critic.optim,
            precision=cfg.precision,
            micro_batch_size=cfg.train.micro_batch_size,
            total_optimizer_steps=cfg.critic_optimizer_steps,
            seed=cfg.train.seed,
        )
        world = cfg.parallel.world_size
        self.groups["critic"] = self._group(CriticWorker, placed["critic"], world, "critic", spec)

    def _components(self) -> PPOComponents:
        from rl.workers import RayCritic

        parts = super()._components()
        shared = {f.name: getattr(parts, f.name) for f in dataclasses.fields(parts)}
        return PPOComponents(**shared, critic=RayCritic(self.groups["critic"]))


def run_ppo_cluster(cfg: PPOConfig, resume_command: str | None = None) -> dict[str, float]:
    """As rl.grpo_cluster.run_grpo_cluster, for PPO."""
    return PPOClusterRun(cfg, resume_command).run()


def run_ppo_any(cfg: PPOConfig, resume_command: str) -> dict[str, float] | None:
    """`rl ppo` (see rl.grpo_cluster.run_rl_any)."""
    from algorithms.ppo import run_ppo

    return run_rl_any(cfg, resume_command, run_ppo, PPOClusterRun)
