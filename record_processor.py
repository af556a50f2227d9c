"""What the MultiLangDaemon runs for each shard (app.properties: executableName)."""

import sys

from orders_cdc.cli import child_main

if __name__ == "__main__":
    sys.exit(child_main())
