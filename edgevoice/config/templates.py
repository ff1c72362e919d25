"""Headers of the shipped configuration files."""

DEVICE_HEADER = """\
edgevoice device configuration (/etc/edgevoice/device.yaml).
Every option is listed with its default; delete what you do not change.
Check a file with:  edgevoice device --check-config --config FILE
The device token is NOT kept here: it is read from the file relay.token_file names,
or from systemd's credential (LoadCredential=device-token:/etc/edgevoice/device.token)."""

RELAY_HEADER = """\
edgevoice relay configuration (/etc/edgevoice/relay.yaml).
Every option is listed with its default; delete what you do not change.
Check a file with:  edgevoice relay --check-config --config FILE
Device tokens are issued with:  edgevoice token add NAME --config FILE"""
