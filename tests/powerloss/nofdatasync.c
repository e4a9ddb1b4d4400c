/* For checking the power-loss harness without a rebuilt server: preloaded,
 * fdatasync(2) does nothing. The server calls fdatasync only for its
 * write-ahead log (Wal::sync and Wal::reset; blobs and the log's growth use
 * fsync), so this is the server with the log's sync removed.
 *
 *   gcc -shared -fPIC -o /tmp/nofdatasync.so tests/powerloss/nofdatasync.c
 *   LD_PRELOAD=/tmp/nofdatasync.so BLOTCDN_BIN=target/debug/blotcdn \
 *     python3 -m pytest -q -rxXf tests/powerloss/test_powerloss.py -k 'not detects'
 *
 * Every [wal] test must then fail with a list of lost acknowledged writes. */
int fdatasync(int fd)
{
    (void)fd;
    return 0;
}
