import json, os, random, subprocess, sys
sys.path.insert(0, "/work/main")
from blockguard.storage.blockdev import BlockDevice
out = "/work/main/results/era-fixture"
def sh(*a): return subprocess.run(a, check=True, capture_output=True, text=True).stdout
def loop(size, name):
    p = f"/tmp/{name}.img"; open(p, "wb").truncate(size)
    return sh("losetup", "--find", "--show", p).strip()
for case, (size, block_sectors, nrounds, seed) in {"small": (16 << 20, 128, 4, 1), "big": (256 << 20, 8, 6, 2)}.items():
    vol, meta = loop(size, f"v{case}"), loop(16 << 20, f"m{case}")
    name = f"fx{case}"
    sh("dmsetup", "create", name, "--table", f"0 {size // 512} era {meta} {vol} {block_sectors}")
    rng = random.Random(seed); blk = block_sectors * 512; info = {"block_sectors": block_sectors, "size": size, "rounds": []}
    with BlockDevice(f"/dev/mapper/{name}", write=True) as d:
        for r in range(nrounds):
            era = int(sh("dmsetup", "status", name).split()[5])
            ws = sorted({rng.randrange(size // blk) for _ in range(rng.randrange(1, 300))})
            for b in ws: d.pwrite_all(os.urandom(512), b * blk)
            d.flush(); info["rounds"].append({"era": era, "blocks": ws})
            sh("dmsetup", "message", name, "0", "checkpoint")
    sh("dmsetup", "message", name, "0", "take_metadata_snap")
    info["status_with_snap"] = sh("dmsetup", "status", name).strip()
    eras = [x["era"] for x in info["rounds"]] + [info["rounds"][-1]["era"] + 1, info["rounds"][-1]["era"] + 2]
    info["era_invalidate"] = {e: sh("era_invalidate", "--written-since", str(e), "--metadata-snapshot", meta) for e in eras}
    sh("dd", f"if={meta}", f"of={out}/{case}-held.img", "bs=1M", "iflag=direct", "status=none")
    sh("dmsetup", "message", name, "0", "drop_metadata_snap")
    sh("dmsetup", "remove", name)
    sh("dd", f"if={meta}", f"of={out}/{case}-offline.img", "bs=1M", "iflag=direct", "status=none")
    info["era_invalidate_offline"] = {e: sh("era_invalidate", "--written-since", str(e), meta) for e in eras}
    json.dump(info, open(f"{out}/{case}.json", "w"), indent=1)
    print(case, "ok", [len(x["blocks"]) for x in info["rounds"]])
