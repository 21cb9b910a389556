//! `/init` of the initramfs: opens the verity root and hands over to systemd.

fn main() {
    let err = slipway_init::initrd::run();
    slipway_init::initrd::refuse(&err);
}
