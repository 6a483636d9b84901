# DKIM verification with independent verifiers, for mailroute's tests (testkit::dkim runs it).
#
#   python3 dkim_verify.py dkimpy DIR     verify DIR/*.eml with dkimpy
#   python3 dkim_verify.py opendkim DIR   verify DIR/*.eml with OpenDKIM's libopendkim
#
# DIR/records.json maps "selector._domainkey.domain" to the TXT record: dkimpy gets it through
# its dnsfunc hook, libopendkim through its key query file. Prints one JSON object per message,
# in file name order: {"file": ..., "ok": bool, "detail": str}; "ok" only for a signature that
# the verifier checked and found good.
import json
import os
import sys


def messages(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".eml"))


def load_records(d):
    with open(os.path.join(d, "records.json")) as f:
        return {k.lower().rstrip("."): v for k, v in json.load(f).items()}


def dkimpy(d):
    import logging

    import dkim

    records = load_records(d)

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        r = records.get(name.lower().rstrip("."))
        return r.encode() if r is not None else None

    for f in messages(d):
        with open(os.path.join(d, f), "rb") as fh:
            msg = fh.read()
        log = []

        class H(logging.Handler):
            def emit(self, rec):
                log.append(rec.getMessage())

        logger = logging.getLogger("dkimpy-" + f)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(H())
        try:
            ok = dkim.DKIM(msg, logger=logger).verify(dnsfunc=dnsfunc)
            detail = "" if ok else "; ".join(log[-3:])
        except Exception as e:  # a verifier error is a failed verification
            ok, detail = False, "%s: %s" % (type(e).__name__, e)
        print(json.dumps({"file": f, "ok": bool(ok), "detail": detail}), flush=True)


def opendkim(d):
    import ctypes

    # libopendkim, the library of the opendkim milter and of opendkim-testmsg (Debian
    # libopendkim11, pulled in by opendkim-tools). opendkim-testmsg itself is not used: the
    # Debian 12 build (2.11.0~beta2) answers "dkim_chunk(): Syntax error" for every message,
    # even an unsigned one; this runs its verification steps (dkim_verify, dkim_chunk,
    # dkim_eom) with the keys from a query file instead of DNS (DKIM_QUERY_FILE).
    lib = ctypes.CDLL(os.environ.get("LIBOPENDKIM", "libopendkim.so.11"))
    lib.dkim_init.restype = ctypes.c_void_p
    lib.dkim_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.dkim_options.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.dkim_verify.restype = ctypes.c_void_p
    lib.dkim_verify.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    lib.dkim_chunk.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.dkim_eom.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.dkim_getresultstr.restype = ctypes.c_char_p
    lib.dkim_getresultstr.argtypes = [ctypes.c_int]
    lib.dkim_getsignature.restype = ctypes.c_void_p
    lib.dkim_getsignature.argtypes = [ctypes.c_void_p]
    lib.dkim_sig_geterror.argtypes = [ctypes.c_void_p]
    lib.dkim_sig_geterrorstr.restype = ctypes.c_char_p
    lib.dkim_sig_geterrorstr.argtypes = [ctypes.c_int]
    lib.dkim_sig_getflags.restype = ctypes.c_uint
    lib.dkim_sig_getflags.argtypes = [ctypes.c_void_p]
    lib.dkim_sig_getbh.argtypes = [ctypes.c_void_p]
    lib.dkim_free.argtypes = [ctypes.c_void_p]
    lib.dkim_close.argtypes = [ctypes.c_void_p]

    keyfile = os.path.join(d, "opendkim-keys")
    with open(keyfile, "w") as f:
        for name, record in load_records(d).items():
            f.write("%s %s\n" % (name, record))
    handle = lib.dkim_init(None, None)
    if not handle:
        sys.exit("dkim_init() failed")
    SETOPT, OPTS_FLAGS, OPTS_QUERYMETHOD, OPTS_QUERYINFO = 1, 0, 6, 7
    flags = ctypes.c_uint(0x100)  # DKIM_LIBFLAGS_FIXCRLF, as opendkim-testmsg sets
    lib.dkim_options(handle, SETOPT, OPTS_FLAGS, ctypes.byref(flags), ctypes.sizeof(flags))
    method = ctypes.c_int(1)  # DKIM_QUERY_FILE
    lib.dkim_options(handle, SETOPT, OPTS_QUERYMETHOD, ctypes.byref(method), ctypes.sizeof(method))
    info = ctypes.create_string_buffer(keyfile.encode())
    lib.dkim_options(handle, SETOPT, OPTS_QUERYINFO, info, len(keyfile))
    for f in messages(d):
        with open(os.path.join(d, f), "rb") as fh:
            msg = fh.read()
        status = ctypes.c_int()
        dkim = lib.dkim_verify(handle, f.encode(), None, ctypes.byref(status))
        if not dkim:
            sys.exit("dkim_verify() failed: %s" % lib.dkim_getresultstr(status.value).decode())
        st = lib.dkim_chunk(dkim, msg, len(msg))
        if st == 0:
            st = lib.dkim_chunk(dkim, None, 0)
        if st == 0:
            st = lib.dkim_eom(dkim, None)
        detail = lib.dkim_getresultstr(st).decode()
        sig = lib.dkim_getsignature(dkim)
        passed = False
        if sig:
            passed = bool(lib.dkim_sig_getflags(sig) & 0x04) and lib.dkim_sig_getbh(sig) == 0  # PASSED, MATCH
            err = lib.dkim_sig_geterror(sig)
            if err != 0:
                detail += ": " + lib.dkim_sig_geterrorstr(err).decode()
        ok = st == 0 and passed
        lib.dkim_free(dkim)
        print(json.dumps({"file": f, "ok": ok, "detail": "" if ok else detail}), flush=True)
    lib.dkim_close(handle)


def main():
    mode, d = sys.argv[1], sys.argv[2]
    if mode == "dkimpy":
        dkimpy(d)
    elif mode == "opendkim":
        opendkim(d)
    else:
        sys.exit("unknown mode " + mode)


if __name__ == "__main__":
    main()
