"""Data-parallel runs through `accelerate launch`: how many processes on how many machines."""

from pathlib import Path

from .setting import Rule, Setting

SECTION = "Multi-process"
SETTINGS = (
    Setting("num_processes", int, 1, "Training processes in all (all machines together; usually one per GPU). More "
            "than 1 launches the run through `accelerate launch`; batch_size stays per process.", minimum=1,
            maximum=4096),
    Setting("num_machines", int, 1, "Machines taking part. Each runs the same config with its own machine_rank.",
            minimum=1, maximum=1024),
    Setting("machine_rank", int, 0, "This machine's number, 0 .. num_machines-1; 0 is the main machine (it writes "
            "the outputs).", minimum=0, maximum=1023),
    Setting("main_process_ip", str, None, "Address of machine 0 that the others connect to (needed when "
            "num_machines > 1).", optional=True),
    Setting("main_process_port", int, None, "TCP port on machine 0 for the processes to meet (default: a free one "
            "on one machine, 29500 on several).", optional=True, minimum=1, maximum=65535),
    Setting("accelerate_config", Path, None, "An accelerate config file (`accelerate config` writes one): "
            "DeepSpeed/FSDP and other launch settings pass through. The keys above, when set, override it.",
            optional=True, path="read", exists="file"),
)


def _processes_fit_machines(v) -> str | None:
    processes, machines = v["num_processes"], v["num_machines"]
    if processes < machines:
        return (f"num_processes ({processes}) counts all machines together and must be at least num_machines "
                f"({machines})")
    if processes % machines:
        return (f"num_processes ({processes}) must split evenly over num_machines ({machines}): the same number of "
                "processes on each machine")
    return None


def _rank_fits(v) -> str | None:
    if v["machine_rank"] >= v["num_machines"]:
        return (f"machine_rank must be in 0..{v['num_machines'] - 1} (num_machines is {v['num_machines']}), "
                f"got {v['machine_rank']}")
    return None


def _main_machine_known(v) -> str | None:
    if v["num_machines"] > 1 and not v["main_process_ip"]:
        return ("main_process_ip is needed with num_machines > 1: the address of machine 0 that the other machines "
                "connect to")
    return None


RULES = (
    Rule(("num_processes", "num_machines"), _processes_fit_machines),
    Rule(("machine_rank", "num_machines"), _rank_fits),
    Rule(("main_process_ip", "num_machines"), _main_machine_known),
)
