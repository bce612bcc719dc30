"""The file names of an image, in one table: every name the engine writes is here.

NAME in pagemap/pages is a pid, or ``shmem-ID`` for a shared memory object.  PIDs are
as the dumped processes saw them (their own PID namespace's numbers).
"""
INVENTORY = "inventory.img"     # Inventory: format, machine, checksums of all files; written last
PSTREE = "pstree.img"           # Process per process, the root first
FILES = "files.img"             # FileEntry per open file description


def task(pid: int) -> str:
    return f"task-{pid}.img"            # TaskCore: per-process state


def core(pid: int) -> str:
    return f"core-{pid}.img"            # ThreadCore per thread, the main thread first


def mm(pid: int) -> str:
    return f"mm-{pid}.img"              # Mm: mm fields, auxv, exe, VMAs


def fds(pid: int) -> str:
    return f"fds-{pid}.img"             # FdEntry per fd


def pagemap(name) -> str:
    return f"pagemap-{name}.img"        # PagemapEntry runs


def pages(name) -> str:
    return f"pages-{name}.img"          # the runs' bytes, in order, checked per block


def file_data(file_id: int) -> str:
    return f"file-{file_id}.img"        # content of a file deleted while open


def pipe_data(pipe_id: int) -> str:
    return f"pipe-data-{pipe_id}.img"   # bytes queued in a pipe, once per pipe


def fifo_data(dev: int, pipe_id: int) -> str:
    return f"fifo-data-{dev}-{pipe_id}.img"     # bytes queued in a FIFO


def locks(pid: int) -> str:
    return f"locks-{pid}.img"           # FileLock per lock the process holds (--file-locks; absent if none)


def timers(pid: int) -> str:
    return f"timers-{pid}.img"          # Timers: itimers and POSIX timers
