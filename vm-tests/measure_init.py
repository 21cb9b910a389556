"""Peak RSS and wall time of a master's first boot (slipway-init's AWS and
secrets steps) against a local moto server, with a scratch directory as `/`.

Usage: python measure_init.py SLIPWAY_INIT_BINARY   (see `just measure-init`)
"""
import os, re, socket, subprocess, sys, tempfile, time

import boto3

binary = sys.argv[1]
port = socket.socket(); port.bind(("127.0.0.1", 0)); port_no = port.getsockname()[1]; port.close()
moto = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(port_no)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    endpoint = f"http://127.0.0.1:{port_no}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port_no), timeout=0.2).close(); break
        except OSError:
            time.sleep(0.1)
    kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    ec2, s3 = boto3.client("ec2", **kw), boto3.client("s3", **kw)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    inst = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]
    az = inst["Placement"]["AvailabilityZone"]
    stable = ".".join(inst["PrivateIpAddress"].split(".")[:3] + ["200"])
    vol = ec2.create_volume(AvailabilityZone=az, Size=1)["VolumeId"]
    alloc = ec2.allocate_address(Domain="vpc")["AllocationId"]
    s3.create_bucket(Bucket="measure-secrets")
    root = tempfile.mkdtemp()
    os.makedirs(f"{root}/sys/class/nvme/nvme1"); open(f"{root}/sys/class/nvme/nvme1/serial", "w").write(vol.replace("-", ""))
    os.makedirs(f"{root}/dev"); open(f"{root}/dev/nvme1n1", "wb").truncate(64 << 20)
    os.makedirs(f"{root}/proc/net"); open(f"{root}/proc/net/route", "w").write("Iface\tDestination\tGateway\nlo\t00000000\t0100007F\n")
    config = f"{root}/stack.toml"
    open(config, "w").write(f'''role = "master"
cluster_name = "measure"
secrets_bucket = "measure-secrets"
master_ip = "{stable}"
pod_cidr = "10.244.0.0/16"
service_cidr = "10.96.0.0/12"
master_eip_allocation = "{alloc}"
master_volume = "{vol}"
region = "us-east-1"
''')
    # mount and ip are replaced by `true` through PATH: the measurement is of slipway-init, not of the host.
    fake = f"{root}/bin"; os.makedirs(fake)
    for tool in ("mount", "ip"):
        os.symlink("/bin/true", f"{fake}/{tool}")
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               SLIPWAY_AWS_ENDPOINT=endpoint)
    t0 = time.time()
    run = subprocess.run(["/usr/bin/time", "-v", binary, "--config", config, "--root", root, "--manifests", "manifests", "--no-boot-check",
                          "--instance-id", inst["InstanceId"], "--availability-zone", az],
                         env=env, capture_output=True, text=True)
    wall = time.time() - t0
    sys.stderr.write(run.stderr)
    if run.returncode != 0:
        sys.exit(f"slipway-init failed ({run.returncode})")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)
    print(f"master first boot against moto: {wall:.2f} s wall, peak RSS {int(rss) / 1024:.1f} MiB, binary {os.path.getsize(binary) / 2**20:.1f} MiB")
finally:
    moto.kill()
