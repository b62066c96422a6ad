"""The printed report: configuration header, per-prompt blocks (standard, speculative, comparison)
and a summary over all prompts. Labels in Chinese (as in the seed's output) or English.

It formats the dictionaries `metrics` builds; it computes nothing itself.
"""

from __future__ import annotations

LABELS = {
    "zh": {
        "title": "{target} 推测解码演示 (草稿 {draft}; C2C Fuser: 目标模型 KV 缓存融合进草稿模型)",
        "draft": "草稿模型", "target": "目标模型", "fuser": "融合器", "fusion": "融合",
        "prefill": "预填充", "decode": "解码", "on": "开", "off": "关", "device": "设备",
        "gates": "开启的门", "no_gate": "无门开启：融合不起作用", "adapter": "草稿适配器",
        "sampling": "采样", "greedy": "贪心 (temperature=0)", "prompts": "提示数",
        "loading": "正在加载模型...", "loaded": "模型加载完成", "warmup": "预热 (不计时)...",
        "prompt": "提示", "standard": "标准生成 (仅目标模型)", "speculative": "推测解码",
        "comparison": "对比", "output": "输出", "latency": "延迟", "tokens": "词元数",
        "throughput": "吞吐", "ttft": "首词元时间", "acceptance": "接受率 (已接受/已起草)",
        "alpha": "单词元接受概率", "tree_alpha": "（树：沿目标所走路径计，不可与链的数值比较）", "predicted": "预测加速比", "needs_standard": "需要标准生成的步时",
        "avg_len": "平均接受长度", "draft_calls": "草稿调用", "target_calls": "目标调用",
        "time_split": "时间分解", "draft_t": "草稿", "target_t": "目标", "fusion_t": "融合",
        "other_t": "其他", "theory": "Leviathan 公式", "per_position": "各位置接受率",
        "latency_speedup": "延迟加速比", "throughput_speedup": "吞吐加速比",
        "match": "输出与目标模型一致", "yes": "是", "no": "否", "diverge": "首个不同位置",
        "summary": "汇总", "by_category": "按类别 (Spec-Bench 视图)", "saved": "结果已保存到", "fused": "融合词元",
        "by_design": "采样时输出本就不同：保持的是目标模型的分布", "margin": "目标模型 top-2 logit 差",
        "context_stop": "在模型上下文处停止：本提示最多生成 {tokens} 个词元 (max_position_embeddings)",
        "why_none": "实测 {measured}：没有一轮起草任何词元（gamma={gamma}：max_new_tokens 留不出空间），推测解码只多了草稿模型的预填充",
        "why_unknown_c": "c 未知（没有标准运行的步时）",
        "why": "为何实测 {measured} 而预测 {predicted}", "why_prefill": "预测只计解码轮次：预填充占推测解码延迟的 {share}",
        "why_rounds": "每轮实得 {actual} 个词元，预测按 E[tokens/round]={expected}（末尾短轮、结束符）",
        "why_slower": "要让推测解码划算 (gamma={gamma})：c 须低于 {c_needed}（实测 {c}），或在此 c 下 alpha 须高于 {alpha_needed}（实测 {alpha}）",
        "why_never": "c={c} 时任何 alpha 都无法加速 (gamma={gamma})：草稿一步的耗时须明显低于目标一步",
        "why_tree": "一轮树推测耗时 {needed} 个目标步：每轮产出须多于此数才划算（实测 {actual}）",
        "why_overhead": "按 Leviathan 公式此处应能加速 ({theory})：损失来自公式忽略的开销：一次验证耗时 {verify} 个目标步、每轮的融合与主机开销、预填充",
    },
    "en": {
        "title": "{target} speculative decoding demo (draft {draft}; C2C Fuser: target KV cache fused into the draft)",
        "draft": "Draft model", "target": "Target model", "fuser": "Fuser", "fusion": "Fusion",
        "prefill": "prefill", "decode": "decode", "on": "on", "off": "off", "device": "Device",
        "gates": "open gates", "no_gate": "none open: fusion changes nothing", "adapter": "draft adapter",
        "sampling": "Sampling", "greedy": "greedy (temperature=0)", "prompts": "Prompts",
        "loading": "Loading models...", "loaded": "Models loaded", "warmup": "Warm-up (not timed)...",
        "prompt": "Prompt", "standard": "Standard generation (target only)", "speculative": "Speculative decoding",
        "comparison": "Comparison", "output": "Output", "latency": "Latency", "tokens": "Tokens",
        "throughput": "Throughput", "ttft": "Time to first token", "acceptance": "Acceptance rate (accepted/drafted)",
        "alpha": "per-token acceptance", "tree_alpha": " (a tree: along the path the target took, not comparable with a chain's)", "predicted": "Predicted speedup", "needs_standard": "needs the standard run's step time",
        "avg_len": "Average accepted length", "draft_calls": "Draft calls", "target_calls": "Target calls",
        "time_split": "Time split", "draft_t": "draft", "target_t": "target", "fusion_t": "fusion",
        "other_t": "other", "theory": "Leviathan closed form", "per_position": "Acceptance per position",
        "latency_speedup": "Latency speedup", "throughput_speedup": "Throughput speedup",
        "match": "Output identical to target", "yes": "yes", "no": "no", "diverge": "first divergence at",
        "summary": "Summary", "by_category": "Per category (the Spec-Bench view)", "saved": "Results saved to", "fused": "fused tokens",
        "by_design": "with sampling outputs differ by design; the target's distribution is what is preserved",
        "margin": "target top-2 logit margin",
        "context_stop": "Stopped at the models' context: this prompt could get at most {tokens} new tokens (max_position_embeddings)",
        "why_none": "Measured {measured}: no round drafted a token (gamma={gamma}: max_new_tokens leaves no room), so speculation only adds the draft's prefill",
        "why_unknown_c": "c unknown (no standard step time)",
        "why": "Why measured {measured} vs predicted {predicted}", "why_prefill": "the prediction covers the rounds only: the prefills take {share} of the speculative latency",
        "why_rounds": "the rounds gave {actual} tokens each against E[tokens/round] {expected} (short last rounds, end of sequence)",
        "why_slower": "for speculation to pay (gamma={gamma}): c must fall below {c_needed} (measured {c}), or alpha rise above {alpha_needed} at this c (measured {alpha})",
        "why_never": "at c={c} no alpha can pay (gamma={gamma}): a draft step must cost clearly less than a target step",
        "why_tree": "a tree round costs {needed} target steps: it pays when a round yields more tokens than that (measured {actual})",
        "why_overhead": "the closed form pays here ({theory}): the loss is the cost it leaves out: a verify costs {verify} target steps, plus each round's fusion and host work, plus the prefills",
    },
}

RULE = "=" * 72


def _short(model: str) -> str:
    """A model's name as users know it: the Hub id, or a local folder's last two parts."""
    parts = model.rstrip("/").split("/")
    return model if len(parts) <= 2 else "/".join(parts[-2:])
THIN = "-" * 72


def _f(x, fmt: str = ".3f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{suffix}"


class Report:
    def __init__(self, lang: str = "zh", write=print):
        self.L, self.write = LABELS[lang], write

    def header(self, config: dict, num_prompts: int) -> None:
        L, f = self.L, config["fusion"]
        sampling = L["greedy"] if config["temperature"] == 0 else (
            f"temperature={config['temperature']}, top_p={config['top_p']}, top_k={config['top_k']}, seed={config['seed']}"
        )
        fusion = (
            f"{L['prefill']} {L['on'] if f['prefill'] else L['off']}, {L['decode']} {L['on'] if f['decode'] else L['off']}, "
            f"{L['gates']} {f['open_gates'][0]}/{f['open_gates'][1]}" + (f" ({L['no_gate']})" if f["open_gates"][0] == 0 else "")
            + (f", {L['adapter']} {f['draft_adapter']['kind']}" if f.get("draft_adapter") else "")
            if f["enabled"] else f"{L['off']} ({f['reason']})"
        )
        lines = [
            RULE, L["title"].format(target=_short(config["target_model"]), draft=_short(config["draft_model"])), RULE,
            f"{L['draft']}: {config['draft_model']}",
            f"{L['target']}: {config['target_model']}",
            f"{L['fuser']}: {config['fuser_checkpoint']}  |  {L['fusion']}: {fusion}",
            (f"tree: budget {config['tree']['budget']}, depth {config['tree']['depth']}, top_k {config['tree']['top_k']}"
             if config.get("tree") else f"gamma: {config['gamma']}"
             + (" (parallel drafting: one draft forward a round)" if config.get("draft_mode") == "parallel" else ""))
            + f"  |  max_new_tokens: {config['max_new_tokens']}  |  {L['sampling']}: {sampling}",
            f"{L['device']}: {config['device']} ({config['dtype']}, threads {config.get('threads')})  |  {L['prompts']}: {num_prompts}",
            RULE,
        ]
        self.write("\n".join(lines))

    def prompt(self, index: int, total: int, prompt: str) -> None:
        self.write(f"\n[{index}/{total}] {self.L['prompt']}: {prompt}\n{THIN}")

    def standard(self, m: dict) -> None:
        L = self.L
        self.write(
            f"--- {L['standard']} ---\n{L['output']}: {m['text']}\n"
            f"{L['latency']}: {m['latency']:.3f} s | {L['tokens']}: {m['num_tokens']} | "
            f"{L['throughput']}: {_f(m['tokens_per_second'], '.2f')} tok/s | {L['ttft']}: {m['time_to_first_token']:.3f} s"
        )

    def speculative(self, m: dict) -> None:
        L = self.L
        per_pos = " ".join(_f(a, ".0%") for a in m["accepted_per_position"])
        self.write(
            f"--- {L['speculative']} ---\n{L['output']}: {m['text']}\n"
            f"{L['latency']}: {m['latency']:.3f} s | {L['tokens']}: {m['num_tokens']} | "
            f"{L['throughput']}: {_f(m['tokens_per_second'], '.2f')} tok/s | {L['ttft']}: {m['time_to_first_token']:.3f} s\n"
            f"{L['acceptance']}: {_f(m['acceptance_rate'], '.1%')} | {L['alpha']}: {_f(m['acceptance_probability'], '.3f')}"
            f"{L['tree_alpha'] if m.get('branching') else ''} | "
            f"{L['avg_len']}: {_f(m['average_accepted_length'], '.2f')} | "
            f"{L['draft_calls']}: {m['draft_calls']} | {L['target_calls']}: {m['target_calls']} | {L['fused']}: {m['fused_tokens']}\n"
            f"{L['time_split']}: {L['draft_t']} {m['draft_time']:.3f} s, {L['target_t']} {m['target_time']:.3f} s, "
            f"{L['fusion_t']} {m['fusion_time']:.3f} s, {L['other_t']} {m['overhead_time']:.3f} s\n"
            f"{L['per_position']}: {per_pos}\n"
            + self._prediction(m)
        )

    def _prediction(self, m: dict) -> str:
        L = self.L
        if m["predicted_speedup"] is None:
            return f"{L['predicted']}: - ({L['needs_standard']})"
        per_round = "tokens/round (measured, a tree)" if m.get("branching") else "E[tokens/round]"
        return (
            f"{L['predicted']}: {_f(m['predicted_speedup'], '.2f', 'x')} = {per_round} "
            f"{_f(m['expected_tokens_per_round'], '.2f')} x target step {1000 * m['target_step_time']:.2f} ms / round "
            f"{1000 * m['round_time']:.2f} ms (alpha={_f(m['acceptance_probability'], '.3f')}, "
            f"{'depth' if m.get('branching') else 'gamma'}={m['gamma']}) | "
            f"{L['theory']}: {_f(m['theoretical_speedup'], '.2f', 'x')} (c={_f(m['cost_ratio_c'], '.3f')})"
        )

    def comparison(self, c: dict, sampling: bool = False) -> None:
        L = self.L
        if c["outputs_match"]:
            match = L["yes"]
        elif sampling:  # two independent samples: differing is expected, the distribution is what is preserved
            match = f"{L['no']} ({L['by_design']})"
        else:
            match = f"{L['no']} ({L['diverge']} {c['first_divergence']}"
            if c.get("divergence_top2_margin") is not None:
                match += f", {L['margin']} {c['divergence_top2_margin']:.4f}"
            match += ")"
        self.write(
            f"--- {L['comparison']} ---\n"
            f"{L['latency_speedup']}: {_f(c['latency_speedup'], '.2f', 'x')} | "
            f"{L['throughput_speedup']}: {_f(c['throughput_speedup'], '.2f', 'x')} | {L['match']}: {match}"
            + self.explanation(c.get("explanation"))
        )

    def explanation(self, e: dict | None) -> str:
        """One line: why measured and predicted speedups differ, and, below 1x, what would have to change."""
        if not e:
            return ""
        L = self.L
        if e.get("no_drafts"):
            return "\n" + L["why_none"].format(measured=_f(e["measured_speedup"], ".2f", "x"), gamma=e["gamma"])
        parts = [L["why_prefill"].format(share=_f(e["prefill_share"], ".0%"))]
        if not e.get("branching"):  # a tree's prediction already uses what its rounds gave
            parts.append(L["why_rounds"].format(actual=_f(e["tokens_per_round"], ".2f"), expected=_f(e["expected_tokens_per_round"], ".2f")))
        if (e["measured_speedup"] or 0) < 1:  # what would have to change for this run to pay
            if e.get("branching"):
                parts.append(L["why_tree"].format(needed=_f(e.get("tokens_needed"), ".2f"), actual=_f(e["tokens_per_round"], ".2f")))
            elif e["cost_ratio_c"] is None:
                parts.append(L["why_unknown_c"])
            elif e["alpha_needed"] is None:
                parts.append(L["why_never"].format(c=_f(e["cost_ratio_c"], ".3f"), gamma=e["gamma"]))
            elif (e["theoretical_speedup"] or 0) >= 1:
                parts.append(L["why_overhead"].format(theory=_f(e["theoretical_speedup"], ".2f", "x"), verify=_f(e["verify_steps"], ".2f")))
            else:
                parts.append(L["why_slower"].format(gamma=e["gamma"], c_needed=_f(e["c_needed"], ".3f"), c=_f(e["cost_ratio_c"], ".3f"),
                                                    alpha_needed=_f(e["alpha_needed"], ".3f"), alpha=_f(e["alpha"], ".3f")))
        head = L["why"].format(measured=_f(e["measured_speedup"], ".2f", "x"), predicted=_f(e["predicted_speedup"], ".2f", "x"))
        return f"\n{head}: " + "; ".join(parts)

    def summary(self, s: dict, sampling: bool = False) -> None:
        L = self.L
        lines = [f"\n{RULE}", f"{L['summary']} ({L['prompts']}: {s['num_prompts']})", RULE]
        if "standard" in s:
            st = s["standard"]
            lines.append(f"{L['standard']}: {st['num_tokens']} {L['tokens']}, {st['latency']:.2f} s, {_f(st['tokens_per_second'], '.2f')} tok/s")
        if "speculative" in s:
            sp = s["speculative"]
            lines.append(
                f"{L['speculative']}: {sp['num_tokens']} {L['tokens']}, {sp['latency']:.2f} s, {_f(sp['tokens_per_second'], '.2f')} tok/s | "
                f"{L['acceptance']}: {_f(sp['acceptance_rate'], '.1%')} | {L['alpha']}: {_f(sp['acceptance_probability'], '.3f')} | "
                f"{L['avg_len']}: {_f(sp['average_accepted_length'], '.2f')} | {L['predicted']}: {_f(sp['predicted_speedup'], '.2f', 'x')}"
            )
        if "comparison" in s:
            c = s["comparison"]
            lines.append(
                f"{L['latency_speedup']}: {_f(c['latency_speedup'], '.2f', 'x')} | {L['throughput_speedup']}: "
                f"{_f(c['throughput_speedup'], '.2f', 'x')} | {L['match']}: {c['prompts_matching']}/{s['num_prompts']}"
                + (f" ({L['by_design']})" if sampling else "") + self.explanation(c.get("explanation"))
            )
        lines.append(RULE)
        self.write("\n".join(lines))
