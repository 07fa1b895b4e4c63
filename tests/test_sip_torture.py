"""RFC 4475 "SIP Torture Test Messages" through the SIP bridge, plus a light fuzz.

Every message of RFC 4475 section 3 is transcribed below byte for byte: CRLF line ends,
the odd whitespace and folding as printed, and the RFC's markup turned back into octets the
way its section 2 says: <allOneLine> joined into one line, <hex>..</hex> as those octets
(`hexb`), <repeat count=N>x</repeat> as `"x" * N`. Each is fed to SipBridge.receive as a UDP
datagram from PEER, and what the bridge sends back (through `on_send`) is checked:

- nothing may ever raise out of SipBridge.receive;
- every answer must be a well-formed SIP response (checked by an independent strict reader
  and by gateway.sip.message.parse), with a reason phrase on errors, the request's Via,
  From, To, Call-ID and CSeq, and the top Via's branch untouched so the sender can match it;
- valid requests get a sensible answer (an INVITE for a user with no device: 100 then 480;
  OPTIONS: 200; unknown methods: 405 or 501 with Allow; Require: 420 with Unsupported...),
  invalid ones a 4xx (505 for SIP/7.0) or, for responses, nothing.

Where RFC 4475 leaves the receiver a choice ("it is acceptable to reject ... a liberal
element may ignore ..."), each acceptable answer is listed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import pytest

from gateway.core.assertions import AssertionPolicy
from gateway.core.calls import Calls, CallSettings
from gateway.core.delivery import Delivery, DeliverySettings
from gateway.core.metrics import Metrics
from gateway.sip.bridge import SIP_STATUS, SipBridge, UserRouter
from gateway.sip.message import MAX_MESSAGE, SipError, SipMessage, StreamFramer, parse
from gateway.sip.transaction import Peer, Send
from gateway.store import Store

NOW = 1_800_000_000.0
SECRET = b"k" * 32
PEER = Peer("udp", "192.0.2.99", 5062)


def hexb(text: str) -> bytes:
    """RFC 4475 2.2: <hex>...</hex> stands for the octets it spells."""
    return bytes.fromhex(text.replace(" ", ""))


def sip(*lines: str | bytes, body: str | bytes = b"") -> bytes:
    """Lines joined with CRLF, the empty line, then the body (a str body's \\n become CRLF)."""
    head = b"\r\n".join(x if isinstance(x, bytes) else x.encode("utf-8") for x in lines)
    if isinstance(body, str):
        body = body.replace("\n", "\r\n").encode("utf-8")
    return head + b"\r\n\r\n" + body


def sdp(origin: str, connection: str | None = None, time: str = "0 0") -> str:
    """The SDP body most RFC 4475 messages carry."""
    return (f"v=0\no=mhandley 29739 7272939 IN IP4 {origin}\ns=-\n"
            f"c=IN IP4 {connection or origin}\nt={time}\nm=audio 49217 RTP/AVP 0 12\n"
            "m=video 3227 RTP/AVP 31\na=rtpmap:31 LPC\n")


# --- RFC 4475 section 3.1.1: valid messages -----------------------------------------------

WSINV = sip(
    "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0",
    "TO :",
    " sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n",
    r'from   : "J Rosenberg \\\""       <sip:jdrosen@example.com>',
    "  ;",
    "  tag = 98asjd8",
    "MaX-fOrWaRdS: 0068",
    "Call-ID: wsinv.ndaksdj@192.0.2.1",
    "Content-Length   : 150",
    "cseq: 0009",
    "  INVITE",
    "Via  : SIP  /   2.0",
    " /UDP",
    "    192.0.2.2;branch=390skdjuw",
    "s :",
    "NewFangledHeader:   newfangled value",
    " continued newfangled value",
    "UnknownHeaderWithUnusualValue: ;;,,;;,;",
    "Content-Type: application/sdp",
    "Route:",
    " <sip:services.example.com;lr;unknownwith=value;unknown-no-value>",
    "v:  SIP  / 2.0  / TCP     spindle.example.com   ;",
    "  branch  =   z9hG4bK9ikj8  ,",
    " SIP  /    2.0   / UDP  192.168.255.111   ; branch=",
    " z9hG4bK30239",
    r'm:"Quoted string \"\"" <sip:jdrosen@example.com> ; newparam =',
    "      newvalue ;",
    "  secondparam ; q = 0.33",
    body=sdp("192.0.2.3", "192.0.2.4"))

INTMETH_METHOD = "!interesting-Method0123456789_*+`.%indeed'~"
INTMETH = sip(
    INTMETH_METHOD + " sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    ":&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0",
    "Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~",
    b'To: "BEL:\\' + hexb("07") + b' NUL:\\' + hexb("00") + b' DEL:\\' + hexb("7F")
    + b"\" <sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com>",
    b"From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%=\""
    + hexb("D180D0B0D0B1D0BED182D0B0D18ED189D0B8D0B9") + b"\";tag=_token~1'+`*%!-.",
    "Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{",
    "CSeq: 139122385 " + INTMETH_METHOD,
    "Max-Forwards: 255",
    b"extensionHeader-!.%*+_`'~:" + hexb("EFBBBFE5A4A7E5819CE99BBB"),
    "Content-Length: 0")

ESC01 = sip(
    "INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0",
    "To: sip:%75se%72@example.com",
    "From: <sip:I%20have%20spaces@example.net>;tag=938",
    "Max-Forwards: 87",
    "i: esc01.239409asdfakjkn23onasd0-3234",
    "CSeq: 234234 INVITE",
    "Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKkdjuw",
    "C: application/sdp",
    "Contact:",
    "  <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>",
    "Content-Length: 150",
    body=sdp("192.0.2.1"))

ESCNULL = sip(
    "REGISTER sip:example.com SIP/2.0",
    "To: sip:null-%00-null@example.com",
    "From: sip:null-%00-null@example.com;tag=839923423",
    "Max-Forwards: 70",
    "Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd",
    "CSeq: 14398234 REGISTER",
    "Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw",
    "Contact: <sip:%00@host5.example.com>",
    "Contact: <sip:%00%00@host5.example.com>",
    "L:0")

ESC02 = sip(
    "RE%47IST%45R sip:registrar.example.com SIP/2.0",
    'To: "%Z%45" <sip:resource@example.com>',
    'From: "%Z%45" <sip:resource@example.com>;tag=f232jadfj23',
    "Call-ID: esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf",
    "Via: SIP/2.0/TCP host.example.com;branch=z9hG4bK209%fzsnel234",
    "CSeq: 29344 RE%47IST%45R",
    "Max-Forwards: 70",
    "Contact: <sip:alias1@host1.example.com>",
    "C%6Fntact: <sip:alias2@host2.example.com>",
    "Contact: <sip:alias3@host3.example.com>",
    "l: 0")

LWSDISP = sip(
    "OPTIONS sip:user@example.com SIP/2.0",
    "To: sip:user@example.com",
    "From: caller<sip:caller@example.com>;tag=323",
    "Max-Forwards: 70",
    "Call-ID: lwsdisp.1234abcd@funky.example.com",
    "CSeq: 60 OPTIONS",
    "Via: SIP/2.0/UDP funky.example.com;branch=z9hG4bKkdjuw",
    "l: 0")

LONGREQ = sip(
    "INVITE sip:user@example.com SIP/2.0",
    'To: "I have a user name of ' + "extreme" * 10 + ' proportion"<sip:user@example.com:6000;'
    "unknownparam1=very" + "long" * 20 + "value;longparam" + "name" * 25
    + "=shortvalue;very" + "long" * 25 + "ParameterNameWithNoValue>",
    "F: sip:" + "amazinglylongcallername" * 5 + "@example.net;tag=12" + "982" * 50 + "424;"
    "unknownheaderparam" + "name" * 20 + "=unknowheaderparam" + "value" * 15
    + ";unknownValueless" + "paramname" * 10,
    "Call-ID: longreq.one" + "really" * 20 + "longcallid",
    "CSeq: 3882340 INVITE",
    "Unknown-" + "Long" * 20 + "-Name: unknown-" + "long" * 20 + "-value; unknown-"
    + "long" * 20 + "-parameter-name = unknown-" + "long" * 20 + "-parameter-value",
    "Via: SIP/2.0/TCP sip33.example.com",
    "v: SIP/2.0/TCP sip32.example.com",
    "V: SIP/2.0/TCP sip31.example.com",
    "Via: SIP/2.0/TCP sip30.example.com",
    "ViA: SIP/2.0/TCP sip29.example.com",
    "VIa: SIP/2.0/TCP sip28.example.com",
    "VIA: SIP/2.0/TCP sip27.example.com",
    "via: SIP/2.0/TCP sip26.example.com",
    "viA: SIP/2.0/TCP sip25.example.com",
    "vIa: SIP/2.0/TCP sip24.example.com",
    "vIA: SIP/2.0/TCP sip23.example.com",
    "V :  SIP/2.0/TCP sip22.example.com",
    "v :  SIP/2.0/TCP sip21.example.com",
    "V  : SIP/2.0/TCP sip20.example.com",
    "v  : SIP/2.0/TCP sip19.example.com",
    "Via : SIP/2.0/TCP sip18.example.com",
    "Via  : SIP/2.0/TCP sip17.example.com",
    *(f"Via: SIP/2.0/TCP sip{n}.example.com" for n in range(16, 0, -1)),
    "Via: SIP/2.0/TCP host.example.com;received=192.0.2.5;branch=very" + "long" * 50
    + "branchvalue",
    "Max-Forwards: 70",
    "Contact: <sip:" + "amazinglylongcallername" * 5 + "@host5.example.net>",
    "Content-Type: application/sdp",
    "l: 150",
    body=sdp("192.0.2.1"))

DBLREQ = sip(
    "REGISTER sip:example.com SIP/2.0",
    "To: sip:j.user@example.com",
    "From: sip:j.user@example.com;tag=43251j3j324",
    "Max-Forwards: 8",
    "I: dblreq.0ha0isndaksdj99sdfafnl3lk233412",
    "Contact: sip:j.user@host.example.com",
    "CSeq: 8 REGISTER",
    "Via: SIP/2.0/UDP 192.0.2.125;branch=z9hG4bKkdjuw23492",
    "Content-Length: 0",
    body=sip(
        "",
        "INVITE sip:joe@example.com SIP/2.0",
        "t: sip:joe@example.com",
        "From: sip:caller@example.net;tag=141334",
        "Max-Forwards: 8",
        "Call-ID: dblreq.0ha0isnda977644900765@192.0.2.15",
        "CSeq: 8 INVITE",
        "Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw380234",
        "Content-Type: application/sdp",
        "Content-Length: 150",
        body=sdp("192.0.2.15").replace("m=video", "m =video")))

SEMIURI = sip(
    "OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0",
    "To: sip:j_user@example.com",
    "From: sip:caller@example.org;tag=33242",
    "Max-Forwards: 3",
    "Call-ID: semiuri.0ha0isndaksdj",
    "CSeq: 8 OPTIONS",
    "Accept: application/sdp, application/pkcs7-mime,",
    "        multipart/mixed, multipart/signed,",
    "        message/sip, message/sipfrag",
    "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKkdjuw",
    "l: 0")

TRANSPORTS = sip(
    "OPTIONS sip:user@example.com SIP/2.0",
    "To: sip:user@example.com",
    "From: <sip:caller@example.com>;tag=323",
    "Max-Forwards: 70",
    "Call-ID:  transports.kijh4akdnaqjkwendsasfdj",
    "Accept: application/sdp",
    "CSeq: 60 OPTIONS",
    "Via: SIP/2.0/UDP t1.example.com;branch=z9hG4bKkdjuw",
    "Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf",
    "Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj",
    "Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en",
    "Via: SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee",
    "l: 0")

MPART01_SMIME = hexb(
    "3082015206092A864886F70D010702A08201433082013F02"
    "01013109300706052B0E03021A300B06092A864886F70D010701318201203082"
    "011C020101307C3070310B300906035504061302555331133011060355040813"
    "0A43616C69666F726E69613111300F0603550407130853616E204A6F7365310E"
    "300C060355040A1305736970697431293027060355040B132053697069742054"
    "65737420436572746966696361746520417574686F7269747902080195007102"
    "330113300706052B0E03021A300D06092A864886F70D01010105000481808EF4"
    "66F948F0522DD2E5978E9D95AAE9F2FE15A06659716292E8DA2AA8D8350A68CE"
    "FFAE3CBD2BFF1675DDD5648E593DD64728F26220F7E941749E330D9A15EDABDB"
    "93D10C42102E7B7289D29CC0C9AE2EFBC7C0CFF9172F3B027E4FC027E1546DE4"
    "B6AA3ABB3E66CCCB5DD6C64B8383149CB8E6FF182D944FE57B65BC99D005")
MPART01 = sip(
    "MESSAGE sip:kumiko@example.org SIP/2.0",
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-;rport",
    "Max-Forwards: 70",
    "Route: <sip:127.0.0.1:5080>",
    "Identity: r5mwreLuyDRYBi/0TiPwEsY3rEVsk/G2WxhgTV1PF7hHuLIK0YWVKZhKv9Mj8UeXqkMVbnVq37CD+8"
    "13gvYjcBUaZngQmXc9WNZSDNGCzA+fWl9MEUHWIZo1CeJebdY/XlgKeTa0Olvq0rt70Q5jiSfbqMJmQFteeivUh"
    "kMWYUA=",
    "Contact: <sip:fluffy@127.0.0.1:5070>",
    "To: <sip:kumiko@example.org>",
    "From: <sip:fluffy@example.com>;tag=2fb0dcc9",
    "Call-ID: 3d9485ad0c49859b@Zmx1ZmZ5LW1hYy0xNi5sb2NhbA..",
    "CSeq: 1 MESSAGE",
    "Content-Transfer-Encoding: binary",
    "Content-Type: multipart/mixed;boundary=7a9cbec02ceef655",
    "Date: Sat, 15 Oct 2005 04:44:56 GMT",
    "User-Agent: SIPimp.org/0.2.5 (curses)",
    "Content-Length: 553",
    body=b"--7a9cbec02ceef655\r\nContent-Type: text/plain\r\n"
    b"Content-Transfer-Encoding: binary\r\n\r\nHello\r\n--7a9cbec02ceef655\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    + MPART01_SMIME + b"\r\n--7a9cbec02ceef655--\r\n")

UNREASON = sip(
    b"SIP/2.0 200 = 2**3 * 5**2 " + hexb(
        "D0BDD0BE20D181D182D0BE20D0B4D0B5D0B2D18FD0BDD0BED181D182D0BE20D0B4D0B5D0B2D18F"
        "D182D18C202D20D0BFD180D0BED181D182D0BED0B5"),
    "Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923",
    "Call-ID: unreason.1234ksdfak3j2erwedfsASdf",
    "CSeq: 35 INVITE",
    "From: sip:user@example.com;tag=11141343",
    "To: sip:user@example.edu;tag=2229",
    "Content-Length: 154",
    "Content-Type: application/sdp",
    "Contact: <sip:user@host198.example.com>",
    body=sdp("192.0.2.198"))

NOREASON = sip(
    "SIP/2.0 100 ",
    "Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe",
    "Call-ID: noreason.asndj203insdf99223ndf",
    "CSeq: 35 INVITE",
    "From: <sip:user@example.com>;tag=39ansfi3",
    "To: <sip:user@example.edu>;tag=902jndnke3",
    "Content-Length: 0",
    "Contact: <sip:user@host105.example.com>")

# --- RFC 4475 section 3.1.2: invalid messages ---------------------------------------------

BADINV01 = sip(
    "INVITE sip:user@example.com SIP/2.0",
    "To: sip:j.user@example.com",
    "From: sip:caller@example.net;tag=134161461246",
    "Max-Forwards: 7",
    "Call-ID: badinv01.0ha0isndaksdjasdf3234nas",
    "CSeq: 8 INVITE",
    "Via: SIP/2.0/UDP 192.0.2.15;;,;,,",
    'Contact: "Joe" <sip:joe@example.org>;;;;',
    "Content-Length: 152",
    "Content-Type: application/sdp",
    body=sdp("192.0.2.15"))

CLERR = sip(
    "INVITE sip:user@example.com SIP/2.0",
    "Max-Forwards: 80",
    "To: sip:j.user@example.com",
    "From: sip:caller@example.net;tag=93942939o2",
    "Contact: <sip:caller@hungry.example.net>",
    "Call-ID: clerr.0ha0isndaksdjweiafasdk3",
    "CSeq: 8 INVITE",
    "Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bK-39234-23523",
    "Content-Type: application/sdp",
    "Content-Length: 9999",
    body=sdp("192.0.2.155"))

NCL = sip(
    "INVITE sip:user@example.com SIP/2.0",
    "Max-Forwards: 254",
    "To: sip:j.user@example.com",
    "From: sip:caller@example.net;tag=32394234",
    "Call-ID: ncl.0ha0isndaksdj2193423r542w35",
    "CSeq: 0 INVITE",
    "Via: SIP/2.0/UDP 192.0.2.53;branch=z9hG4bKkdjuw",
    "Contact: <sip:caller@example53.example.net>",
    "Content-Type: application/sdp",
    "Content-Length: -999",
    body=sdp("192.0.2.53"))

SCALAR02 = sip(
    "REGISTER sip:example.com SIP/2.0",
    "Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bK342sdfoi3",
    "To: <sip:user@example.com>",
    "From: <sip:user@example.com>;tag=239232jh3",
    "CSeq: 36893488147419103232 REGISTER",
    "Call-ID: scalar02.23o0pd9vanlq3wnrlnewofjas9ui32",
    "Max-Forwards: 300",
    "Expires: 1" + "0" * 100,
    "Contact: <sip:user@host129.example.com>",
    "  ;expires=280297596632815",
    "Content-Length: 0")

SCALARLG = sip(
    "SIP/2.0 503 Service Unavailable",
    "Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bKzzxdiwo34sw;received=192.0.2.129",
    "To: <sip:user@example.com>",
    "From: <sip:other@example.net>;tag=2easdjfejw",
    "CSeq: 9292394834772304023312 OPTIONS",
    "Call-ID: scalarlg.noase0of0234hn2qofoaf0232aewf2394r",
    "Retry-After: 949302838503028349304023988",
    'Warning: 1812 overture "In Progress"',
    "Content-Length: 0")

QUOTBAL = sip(
    "INVITE sip:user@example.com SIP/2.0",
    'To: "Mr. J. User <sip:j.user@example.com>',
    "From: sip:caller@example.net;tag=93334",
    "Max-Forwards: 10",
    "Call-ID: quotbal.aksdj",
    "Contact: <sip:caller@host59.example.net>",
    "CSeq: 8 INVITE",
    "Via: SIP/2.0/UDP 192.0.2.59:5050;branch=z9hG4bKkdjuw39234",
    "Content-Type: application/sdp",
    "Content-Length: 152",
    body=sdp("192.0.2.15"))

LTGTRURI = sip(
    "INVITE <sip:user@example.com> SIP/2.0",
    "To: sip:user@example.com",
    "From: sip:caller@example.net;tag=39291",
    "Max-Forwards: 23",
    "Call-ID: ltgtruri.1@192.0.2.5",
    "CSeq: 1 INVITE",
    "Via: SIP/2.0/UDP 192.0.2.5",
    "Contact: <sip:caller@host5.example.net>",
    "Content-Type: application/sdp",
    "Content-Length: 159",
    body=sdp("192.0.2.5", time="3149328700 0"))

LWSRURI = sip(
    "INVITE sip:user@example.com; lr SIP/2.0",
    "To: sip:user@example.com;tag=3xfe-9921883-z9f",
    "From: sip:caller@example.net;tag=231413434",
    "Max-Forwards: 5",
    "Call-ID: lwsruri.asdfasdoeoi2323-asdfwrn23-asd834rk423",
    "CSeq: 2130706432 INVITE",
    "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKkdjuw2395",
    "Contact: <sip:caller@host1.example.net>",
    "Content-Type: application/sdp",
    "Content-Length: 159",
    body=sdp("192.0.2.1", time="3149328700 0"))

LWSSTART = sip(
    "INVITE  sip:user@example.com  SIP/2.0",
    "Max-Forwards: 8",
    "To: sip:user@example.com",
    "From: sip:caller@example.net;tag=8814",
    "Call-ID: lwsstart.dfknq234oi243099adsdfnawe3@example.com",
    "CSeq: 1893884 INVITE",
    "Via: SIP/2.0/UDP host1.example.com;branch=z9hG4bKkdjuw3923",
    "Contact: <sip:caller@host1.example.net>",
    "Content-Type: application/sdp",
    "Content-Length: 150",
    body=sdp("192.0.2.1"))

TRWS = sip(
    "OPTIONS sip:remote-target@example.com SIP/2.0" + "  ",
    "Via: SIP/2.0/TCP host1.examle.com;branch=z9hG4bK299342093",
    "To: <sip:remote-target@example.com>",
    "From: <sip:local-resource@example.com>;tag=329429089",
    "Call-ID: trws.oicu34958239neffasdhr2345r",
    "Accept: application/sdp",
    "CSeq: 238923 OPTIONS",
    "Max-Forwards: 70",
    "Content-Length: 0")

ESCRURI = sip(
    "INVITE sip:user@example.com?Route=%3Csip:example.com%3E SIP/2.0",
    "To: sip:user@example.com",
    "From: sip:caller@example.net;tag=341518",
    "Max-Forwards: 7",
    "Contact: <sip:caller@host39923.example.net>",
    "Call-ID: escruri.23940-asdfhj-aje3br-234q098w-fawerh2q-h4n5",
    "CSeq: 149209342 INVITE",
    "Via: SIP/2.0/UDP host-of-the-hour.example.com;branch=z9hG4bKkdjuw",
    "Content-Type: application/sdp",
    "Content-Length: 150",
    body=sdp("192.0.2.1"))

BADDATE = sip(
    "INVITE sip:user@example.com SIP/2.0",
    "To: sip:user@example.com",
    "From: sip:caller@example.net;tag=2234923",
    "Max-Forwards: 70",
    "Call-ID: baddate.239423mnsadf3j23lj42--sedfnm234",
    "CSeq: 1392934 INVITE",
    "Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKkdjuw",
    "Date: Fri, 01 Jan 2010 16:00:00 EST",
    "Contact: <sip:caller@host5.example.net>",
    "Content-Type: application/sdp",
    "Content-Length: 150",
    body=sdp("192.0.2.5"))

REGBADCT = sip(
    "REGISTER sip:example.com SIP/2.0",
    "To: sip:user@example.com",
    "From: sip:user@example.com;tag=998332",
    "Max-Forwards: 70",
    "Call-ID: regbadct.k345asrl3fdbv@10.0.0.1",
    "CSeq: 1 REGISTER",
    "Via: SIP/2.0/UDP 135.180.130.133:5060;branch=z9hG4bKkdjuw",
    "Contact: sip:user@example.com?Route=%3Csip:sip.example.com%3E",
    "l: 0")

BADASPEC = sip(
    "OPTIONS sip:user@example.org SIP/2.0",
    "Via: SIP/2.0/UDP host4.example.com:5060;branch=z9hG4bKkdju43234",
    "Max-Forwards: 70",
    'From: "Bell, Alexander" <sip:a.g.bell@example.com>;tag=433423',
    'To: "Watson, Thomas" < sip:t.watson@example.org >',
    "Call-ID: badaspec.sdf0234n2nds0a099u23h3hnnw009cdkne3",
    "Accept: application/sdp",
    "CSeq: 3923239 OPTIONS",
    "l: 0")

BADDN = sip(
    "OPTIONS sip:t.watson@example.org SIP/2.0",
    "Via:     SIP/2.0/UDP c.example.com:5060;branch=z9hG4bKkdjuw",
    "Max-Forwards:      70",
    "From:    Bell, Alexander <sip:a.g.bell@example.com>;tag=43",
    "To:      Watson, Thomas <sip:t.watson@example.org>",
    "Call-ID: baddn.31415@c.example.com",
    "Accept: application/sdp",
    "CSeq:    3923239 OPTIONS",
    "l: 0")

BADVERS = sip(
    "OPTIONS sip:t.watson@example.org SIP/7.0",
    "Via:     SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw",
    "Max-Forwards:     70",
    "From:    A. Bell <sip:a.g.bell@example.com>;tag=qweoiqpe",
    "To:      T. Watson <sip:t.watson@example.org>",
    "Call-ID: badvers.31417@c.example.com",
    "CSeq:    1 OPTIONS",
    "l: 0")

MISMATCH01 = sip(
    "OPTIONS sip:user@example.com SIP/2.0",
    "To: sip:j.user@example.com",
    "From: sip:caller@example.net;tag=34525",
    "Max-Forwards: 6",
    "Call-ID: mismatch01.dj0234sxdfl3",
    "CSeq: 8 INVITE",
    "Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKkdjuw",
    "l: 0")

MISMATCH02 = sip(
    "NEWMETHOD sip:user@example.com SIP/2.0",
    "To: sip:j.user@example.com",
    "From: sip:caller@example.net;tag=34525",
    "Max-Forwards: 6",
    "Call-ID: mismatch02.dj0234sxdfl3",
    "CSeq: 8 INVITE",
    "Contact: <sip:caller@host.example.net>",
    "Via: SIP/2.0/UDP host.example.net;branch=z9hG4bKkdjuw",
    "Content-Type: application/sdp",
    "l: 138",
    body="v=0\no=mhandley 29739 7272939 IN IP4 192.0.2.1\nc=IN IP4 192.0.2.1\n"
    "m=audio 49217 RTP/AVP 0 12\nm=video 3227 RTP/AVP 31\na=rtpmap:31 LPC\n")

BIGCODE = sip(
    "SIP/2.0 4294967301 better not break the receiver",
    "Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe",
    "Call-ID: bigcode.asdof3uj203asdnf3429uasdhfas3ehjasdfas9i",
    "CSeq: 353494 INVITE",
    "From: <sip:user@example.com>;tag=39ansfi3",
    "To: <sip:user@example.edu>;tag=902jndnke3",
    "Content-Length: 0",
    "Contact: <sip:user@host105.example.com>")

# --- RFC 4475 section 3.2: transaction layer semantics ------------------------------------

BADBRANCH = sip(
    "OPTIONS sip:user@example.com SIP/2.0",
    "To: sip:user@example.com",
    "From: sip:caller@example.org;tag=33242",
    "Max-Forwards: 3",
    "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK",
    "Accept: application/sdp",
    "Call-ID: badbranch.sadonfo23i420jv0as0derf3j3n",
    "CSeq: 8 OPTIONS",
    "l: 0")

# --- RFC 4475 section 3.3: application layer semantics ------------------------------------

INSUF = sip(
    "INVITE sip:user@example.com SIP/2.0",
    "CSeq: 193942 INVITE",
    "Via: SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf",
    "Content-Type: application/sdp",
    "l: 152",
    body=sdp("192.0.2.95"))

UNKSCM = sip(
    "OPTIONS nobodyKnowsThisScheme:totallyopaquecontent SIP/2.0",
    "To: sip:user@example.com",
    "From: sip:caller@example.net;tag=384",
    "Max-Forwards: 3",
    "Call-ID: unkscm.nasdfasser0q239nwsdfasdkl34",
    "CSeq: 3923423 OPTIONS",
    "Via: SIP/2.0/TCP host9.example.com;branch=z9hG4bKkdjuw39234",
    "Content-Length: 0")

NOVELSC = sip(
    "OPTIONS soap.beep://192.0.2.103:3002 SIP/2.0",
    "To: sip:user@example.com",
    "From: sip:caller@example.net;tag=384",
    "Max-Forwards: 3",
    "Call-ID: novelsc.asdfasser0q239nwsdfasdkl34",
    "CSeq: 3923423 OPTIONS",
    "Via: SIP/2.0/TCP host9.example.com;branch=z9hG4bKkdjuw39234",
    "Content-Length: 0")

UNKSM2 = sip(
    "REGISTER sip:example.com SIP/2.0",
    "To: isbn:2983792873",
    "From: <http://www.example.com>;tag=3234233",
    "Call-ID: unksm2.daksdj@hyphenated-host.example.com",
    "CSeq: 234902 REGISTER",
    "Max-Forwards: 70",
    "Via: SIP/2.0/UDP 192.0.2.21:5060;branch=z9hG4bKkdjuw",
    "Contact: <name:John_Smith>",
    "l: 0")

BEXT01 = sip(
    "OPTIONS sip:user@example.com SIP/2.0",
    "To: sip:j_user@example.com",
    "From: sip:caller@example.net;tag=242etr",
    "Max-Forwards: 6",
    "Call-ID: bext01.0ha0isndaksdj",
    "Require: nothingSupportsThis, nothingSupportsThisEither",
    "Proxy-Require: noProxiesSupportThis, norDoAnyProxiesSupportThis",
    "CSeq: 8 OPTIONS",
    "Via: SIP/2.0/TLS fold-and-staple.example.com;branch=z9hG4bKkdjuw",
    "Content-Length: 0")

INVUT = sip(
    "INVITE sip:user@example.com SIP/2.0",
    "Contact: <sip:caller@host5.example.net>",
    "To: sip:j.user@example.com",
    "From: sip:caller@example.net;tag=8392034",
    "Max-Forwards: 70",
    "Call-ID: invut.0ha0isndaksdjadsfij34n23d",
    "CSeq: 235448 INVITE",
    "Via: SIP/2.0/UDP somehost.example.com;branch=z9hG4bKkdjuw",
    "Content-Type: application/unknownformat",
    "Content-Length: 40",
    body='<audio>\n <pcmu port="443"/>\n</audio>\n')

REGAUT01 = sip(
    "REGISTER sip:example.com SIP/2.0",
    "To: sip:j.user@example.com",
    "From: sip:j.user@example.com;tag=87321hj23128",
    "Max-Forwards: 8",
    "Call-ID: regaut01.0ha0isndaksdj",
    "CSeq: 9338 REGISTER",
    "Via: SIP/2.0/TCP 192.0.2.253;branch=z9hG4bKkdjuw",
    "Authorization: NoOneKnowsThisScheme opaque-data=here",
    "Content-Length:0")

MULTI01 = sip(
    "INVITE sip:user@company.com SIP/2.0",
    "Contact: <sip:caller@host25.example.net>",
    "Via: SIP/2.0/UDP 192.0.2.25;branch=z9hG4bKkdjuw",
    "Max-Forwards: 70",
    "CSeq: 5 INVITE",
    "Call-ID: multi01.98asdh@192.0.2.1",
    "CSeq: 59 INVITE",
    "Call-ID: multi01.98asdh@192.0.2.2",
    "From: sip:caller@example.com;tag=3413415",
    "To: sip:user@example.com",
    "To: sip:other@example.net",
    "From: sip:caller@example.net;tag=2923420123",
    "Content-Type: application/sdp",
    "l: 154",
    "Contact: <sip:caller@host36.example.net>",
    "Max-Forwards: 5",
    body=sdp("192.0.2.25") + "\n")

MCL01 = sip(
    "OPTIONS sip:user@example.com SIP/2.0",
    "Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bK293423",
    "To: sip:user@example.com",
    "From: sip:other@example.net;tag=3923942",
    "Call-ID: mcl01.fhn2323orihawfdoa3o4r52o3irsdf",
    "CSeq: 15932 OPTIONS",
    "Content-Length: 13",
    "Max-Forwards: 60",
    "Content-Length: 5",
    "Content-Type: text/plain",
    body="There's no way to know how many octets are supposed to be here.\n\n")

BCAST = sip(
    "SIP/2.0 200 OK",
    "Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923",
    "Via: SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1saber23",
    "Call-ID: bcast.0384840201234ksdfak3j2erwedfsASdf",
    "CSeq: 35 INVITE",
    "From: sip:user@example.com;tag=11141343",
    "To: sip:user@example.edu;tag=2229",
    "Content-Length: 154",
    "Content-Type: application/sdp",
    "Contact: <sip:user@host28.example.com>",
    body=sdp("192.0.2.198"))

ZEROMF = sip(
    "OPTIONS sip:user@example.com SIP/2.0",
    "To: sip:user@example.com",
    "From: sip:caller@example.net;tag=3ghsd41",
    "Call-ID: zeromf.jfasdlfnm2o2l43r5u0asdfas",
    "CSeq: 39234321 OPTIONS",
    "Via: SIP/2.0/UDP host1.example.com;branch=z9hG4bKkdjuw2349i",
    "Max-Forwards: 0",
    "Content-Length: 0")

CPARAM01 = sip(
    "REGISTER sip:example.com SIP/2.0",
    "Via: SIP/2.0/UDP saturn.example.com:5060;branch=z9hG4bKkdjuw",
    "Max-Forwards: 70",
    "From: sip:watson@example.com;tag=DkfVgjkrtMwaerKKpe",
    "To: sip:watson@example.com",
    "Call-ID: cparam01.70710@saturn.example.com",
    "CSeq: 2 REGISTER",
    "Contact: sip:+19725552222@gw1.example.net;unknownparam",
    "l: 0")

CPARAM02 = sip(
    "REGISTER sip:example.com SIP/2.0",
    "Via: SIP/2.0/UDP saturn.example.com:5060;branch=z9hG4bKkdjuw",
    "Max-Forwards: 70",
    "From: sip:watson@example.com;tag=838293",
    "To: sip:watson@example.com",
    "Call-ID: cparam02.70710@saturn.example.com",
    "CSeq: 3 REGISTER",
    "Contact: <sip:+19725552222@gw1.example.net;unknownparam>",
    "l: 0")

REGESCRT = sip(
    "REGISTER sip:example.com SIP/2.0",
    "To: sip:user@example.com",
    "From: sip:user@example.com;tag=8",
    "Max-Forwards: 70",
    "Call-ID: regescrt.k345asrl3fdbv@192.0.2.1",
    "CSeq: 14398234 REGISTER",
    "Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw",
    "M: <sip:user@example.com?Route=%3Csip:sip.example.com%3E>",
    "L:0")

SDP01 = sip(
    "INVITE sip:user@example.com SIP/2.0",
    "To: sip:j_user@example.com",
    "Contact: <sip:caller@host15.example.net>",
    "From: sip:caller@example.net;tag=234",
    "Max-Forwards: 5",
    "Call-ID: sdp01.ndaksdj9342dasdd",
    "Accept: text/nobodyKnowsThis",
    "CSeq: 8 INVITE",
    "Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw",
    "Content-Length: 150",
    "Content-Type: application/sdp",
    body=sdp("192.0.2.5"))

# --- RFC 4475 section 3.4: backward compatibility -----------------------------------------

INV2543 = sip(
    "INVITE sip:UserB@example.com SIP/2.0",
    "Via: SIP/2.0/UDP iftgw.example.com",
    "From: <sip:+13035551111@ift.client.example.net;user=phone>",
    "Record-Route: <sip:UserB@example.com;maddr=ss1.example.com>",
    "To: sip:+16505552222@ss1.example.net;user=phone",
    "Call-ID: inv2543.1717@ift.client.example.com",
    "CSeq: 56 INVITE",
    "Content-Type: application/sdp",
    body="v=0\no=mhandley 29739 7272939 IN IP4 192.0.2.5\ns=-\nc=IN IP4 192.0.2.5\nt=0 0\n"
    "m=audio 49217 RTP/AVP 0\n")


# --- what each must get back --------------------------------------------------------------

@dataclass(frozen=True)
class Expect:
    """The acceptable sequences of response codes sent back; () means dropped."""

    answers: tuple[tuple[int, ...], ...]
    rfc: str  # what RFC 4475 says of it
    headers: dict[int, tuple[str, ...]] = field(default_factory=dict)  # required, by status


INVITE_NO_DEVICE = ((100, 480),)
UNKNOWN_METHOD = {405: ("allow",), 501: ("allow",)}

CASES: dict[str, tuple[bytes, Expect]] = {
    # 3.1.1 valid
    # wsinv's To has a tag: an INVITE for a dialog we do not know gets 481 (RFC 3261 12.2.2).
    "wsinv": (WSINV, Expect(((100, 481), *INVITE_NO_DEVICE),
                            "3.1.1.1: all elements treat it as well formed")),
    "intmeth": (INTMETH, Expect(((405,), (501,)), "3.1.1.2: endpoints answer 501 with Allow",
                                UNKNOWN_METHOD)),
    "esc01": (ESC01, Expect(INVITE_NO_DEVICE, "3.1.1.3: a parser must accept it")),
    "escnull": (ESCNULL, Expect(((405,),), "3.1.1.4: well formed; parsers must accept it",
                                {405: ("allow",)})),
    "esc02": (ESC02, Expect(((405,), (501,)), "3.1.1.5: unknown method, endpoints answer 501",
                            UNKNOWN_METHOD)),
    "lwsdisp": (LWSDISP, Expect(((200,),), "3.1.1.6: elements should accept it")),
    "longreq": (LONGREQ, Expect(INVITE_NO_DEVICE, "3.1.1.7: well formed")),
    "dblreq": (DBLREQ, Expect(((405,),), "3.1.1.8: the REGISTER is handled, the INVITE "
                              "octets after it ignored", {405: ("allow",)})),
    "semiuri": (SEMIURI, Expect(((200,),), "3.1.1.9: well formed")),
    "transports": (TRANSPORTS, Expect(((200,),), "3.1.1.10: parsers must accept it")),
    "mpart01": (MPART01, Expect(((415,), (480,)), "3.1.1.11: parsers must accept it even if "
                                "multipart is not supported", {415: ("accept",)})),
    "unreason": (UNREASON, Expect(((),), "3.1.1.12: a parser must accept it (a stray response)")),
    "noreason": (NOREASON, Expect(((),), "3.1.1.13: a parser must accept it (a stray response)")),
    # 3.1.2 invalid
    "badinv01": (BADINV01, Expect(((400,), ()), "3.1.2.1: respond 400 (its Via is broken)")),
    "clerr": (CLERR, Expect(((400,),), "3.1.2.2: over UDP, respond 400")),
    "ncl": (NCL, Expect(((400,),), "3.1.2.3: respond with an error")),
    "scalar02": (SCALAR02, Expect(((400,),), "3.1.2.4: respond 400 because of the CSeq")),
    "scalarlg": (SCALARLG, Expect(((),), "3.1.2.5: a response; simply discard it")),
    "quotbal": (QUOTBAL, Expect(((400,),), "3.1.2.6: return 400")),
    "ltgtruri": (LTGTRURI, Expect(((400,),), "3.1.2.7: reasonable always to reject with 400")),
    "lwsruri": (LWSRURI, Expect(((400,),), "3.1.2.8: respond 400")),
    "lwsstart": (LWSSTART, Expect(((400,), *INVITE_NO_DEVICE),
                                  "3.1.2.9: reject as malformed, or ignore the extra SPs")),
    "trws": (TRWS, Expect(((400,), (200,)), "3.1.2.10: reject as malformed, or ignore the SPs")),
    "escruri": (ESCRURI, Expect(((400,), *INVITE_NO_DEVICE),
                                "3.1.2.11: reject with 400, or ignore the escaped headers")),
    "baddate": (BADDATE, Expect(((400,), *INVITE_NO_DEVICE),
                                "3.1.2.12: reject, or ignore the Date when not using it")),
    "regbadct": (REGBADCT, Expect(((400,), (405,)), "3.1.2.13: reasonable to respond 400")),
    "badaspec": (BADASPEC, Expect(((400,), (200,)), "3.1.2.14: reject with 400, or ignore "
                                  "the spaces")),
    "baddn": (BADDN, Expect(((400,), (200,)), "3.1.2.15: reject with 400, or infer quotes")),
    "badvers": (BADVERS, Expect(((505,),), "3.1.2.16: respond 505 Version Not Supported")),
    "mismatch01": (MISMATCH01, Expect(((400,),), "3.1.2.17: respond 400")),
    "mismatch02": (MISMATCH02, Expect(((501,), (400,)), "3.1.2.18: respond 501 (400 is "
                                      "acceptable)")),
    "bigcode": (BIGCODE, Expect(((),), "3.1.2.19: a response; simply drop it")),
    # 3.2 transaction layer
    "badbranch": (BADBRANCH, Expect(((200,), (400,)), "3.2.1: reject with 400, or fall back "
                                    "to RFC 2543 matching")),
    # 3.3 application layer
    "insuf": (INSUF, Expect(((400,),), "3.3.1: respond 400 Bad Request")),
    "unkscm": (UNKSCM, Expect(((416,),), "3.3.2: reject with 416 Unsupported URI Scheme")),
    "novelsc": (NOVELSC, Expect(((416,),), "3.3.3: 416 unless it handles soap.beep")),
    "unksm2": (UNKSM2, Expect(((400,), (405,)), "3.3.4: well formed; a registrar answers 400 "
                              "(To must be SIP or SIPS)")),
    "bext01": (BEXT01, Expect(((420,),), "3.3.5: 420 with Unsupported listing the Require "
                              "options", {420: ("unsupported",)})),
    # lpgw never reads an INVITE's body (the app answers over its own registration), and
    # PBXs do send multipart SDP+ISUP bodies: refusing them would lose calls. So the call is
    # offered as usual (480 here: nobody bound) rather than refused with 415.
    "invut": (INVUT, Expect(((415,), (100, 415), *INVITE_NO_DEVICE), "3.3.6: 415 Unsupported "
                            "Media Type with Accept; lpgw ignores INVITE bodies",
                            {415: ("accept",)})),
    "regaut01": (REGAUT01, Expect(((401,), (403,), (405,)), "3.3.7: a registrar challenges "
                                  "(we are no registrar: 405)")),
    "multi01": (MULTI01, Expect(((400,), (100, 400)), "3.3.8: respond 400 Bad Request")),
    "mcl01": (MCL01, Expect(((400,),), "3.3.9: respond with an error (400)")),
    "bcast": (BCAST, Expect(((),), "3.3.10: a stray response; never forwarded anywhere")),
    "zeromf": (ZEROMF, Expect(((200,),), "3.3.11: an endpoint processes it as usual")),
    "cparam01": (CPARAM01, Expect(((405,),), "3.3.12: well formed (we are no registrar)")),
    "cparam02": (CPARAM02, Expect(((405,),), "3.3.13: well formed (we are no registrar)")),
    "regescrt": (REGESCRT, Expect(((405,), (400,)), "3.3.14: a registrar would accept it")),
    "sdp01": (SDP01, Expect((*INVITE_NO_DEVICE, (100, 406), (406,)),
                            "3.3.15: could respond 406 Not Acceptable")),
    # 3.4 backward compatibility
    "inv2543": (INV2543, Expect(INVITE_NO_DEVICE, "3.4.1: RFC 3261 elements should accept it")),
}

# Content-Length is deliberately wrong in these; everywhere else it must match the body.
BAD_LENGTH = {"clerr", "ncl", "mcl01", "inv2543"}


# --- the harness --------------------------------------------------------------------------

class Harness:
    """A SipBridge over a real Delivery and SQLite store, recording what it sends."""

    def __init__(self, store: Store) -> None:
        metrics = Metrics()
        self.delivery = Delivery(store, token_secret=SECRET, gateway_id="gw1",
                                 settings=DeliverySettings(), policy=AssertionPolicy(),
                                 metrics=metrics)
        router = UserRouter([], {}, store)
        self.calls = Calls(self.delivery, CallSettings(), end_status=SIP_STATUS)
        self.bridge = SipBridge(self.calls, self.delivery, router, metrics)
        self.sent: list[Send] = []
        self.now = NOW

    def feed(self, data: bytes, peer: Peer = PEER, stream: bool = False) -> list[SipMessage]:
        """One message in; the responses it caused, each checked to be well formed."""
        before = len(self.sent)
        self.now += 1.0
        self.receive(data, peer, self.now, stream=stream)
        return [check_response(s.data) for s in self.sent[before:]]

    def receive(self, data: bytes, peer: Peer, now: float, stream: bool = False) -> None:
        """What the SIP shell does with one message: the bridge's sends kept, in order."""
        self.bridge.receive(data, peer, now, stream=stream)
        self._take()

    def timer(self, now: float) -> None:
        self.bridge.handle_timer(now)
        self._take()

    def _take(self) -> None:
        self.delivery.actions_to_send()  # no device is connected here
        self.sent.extend(o for o in self.bridge.outputs() if isinstance(o, Send))


@pytest.fixture
def harness(tmp_path):
    store = Store(tmp_path / "state" / "lpgw.db")
    yield Harness(store)
    store.close()


STATUS_LINE = re.compile(r"SIP/2\.0 ([1-6][0-9][0-9]) ([^\r\n]*)")
HEADER_LINE = re.compile(r"([A-Za-z0-9\-.!%*_+`'~]+):[ \t]*([^\r\n]*)")


def check_response(data: bytes) -> SipMessage:
    """A strict, independent reading of what we send, then the gateway's own parser."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no empty line after the headers: {data[:200]!r}"
    lines = head.decode("utf-8").split("\r\n")
    status = STATUS_LINE.fullmatch(lines[0])
    assert status, f"bad status line {lines[0]!r}"
    headers = []
    for line in lines[1:]:
        m = HEADER_LINE.fullmatch(line)
        assert m, f"bad header line {line!r}"
        headers.append((m.group(1).lower(), m.group(2)))
    lengths = [v for k, v in headers if k in ("content-length", "l")]
    assert lengths == [str(len(body))], f"Content-Length {lengths} for {len(body)} octets"
    if int(status.group(1)) >= 300:
        assert status.group(2).strip(), f"no reason phrase: {lines[0]!r}"
    msg = parse(data)
    assert not msg.is_request and msg.status == int(status.group(1))
    for name in ("via", "from", "to", "call-id", "cseq"):
        assert msg.get(name) is not None, f"response without {name}: {data[:300]!r}"
    return msg


def branch_of(via: str) -> str | None:
    m = re.search(r";\s*branch\s*=\s*([^;,\s]+)", via)
    return m.group(1) if m else None


def request_of(data: bytes) -> SipMessage | None:
    try:
        msg = parse(data)
    except SipError:
        return None
    return msg if msg.is_request else None


# --- the tests ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_transcription_is_consistent(name):
    """Our copy of the RFC's bytes: Content-Length matches the body where the RFC means it
    to, and the header block is UTF-8 (RFC 3261 25.1)."""
    data, _ = CASES[name]
    head, _, body = data.partition(b"\r\n\r\n")
    head.decode("utf-8")
    if name in BAD_LENGTH or name == "dblreq":
        return
    length = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
    assert length is not None
    assert int(length.group(1)) == len(body)


def test_mpart01_smime_part_is_whole():
    """The <hex> blob of 3.1.1.11 is one DER object: 0x30 0x82 then its length."""
    assert MPART01_SMIME[:2] == b"\x30\x82"
    assert len(MPART01_SMIME) == 4 + int.from_bytes(MPART01_SMIME[2:4], "big")
    assert b"\x00" in MPART01_SMIME and b"\r" in MPART01_SMIME


@pytest.mark.parametrize("name", sorted(CASES))
def test_rfc4475_message(harness, name):
    data, expect = CASES[name]
    responses = harness.feed(data)  # must not raise
    got = tuple(r.status for r in responses)
    assert got in expect.answers, (
        f"{name}: sent {got or 'nothing'} "
        f"({'; '.join(f'{r.status} {r.reason}' for r in responses)}), "
        f"expected one of {expect.answers} (RFC 4475 {expect.rfc})")
    for response in responses:
        for header in expect.headers.get(response.status, ()):
            assert response.get(header) is not None, f"{name}: {response.status} without {header}"
    request = request_of(data)
    if request is None or not responses:
        return
    # Responses go back along the request's Vias, the top one's branch untouched (RFC 3261
    # 8.2.6.2, 17.1.3: the sender matches the response to its transaction by that branch).
    for response in responses:
        sent_vias, got_vias = request.get_all("via"), response.get_all("via")
        assert len(got_vias) == len(sent_vias), f"{name}: Vias {got_vias} for {sent_vias}"
        assert branch_of(got_vias[0]) == branch_of(sent_vias[0]), (
            f"{name}: top Via branch changed: {sent_vias[0]!r} -> {got_vias[0]!r}")
        assert got_vias[1:] == sent_vias[1:]
        assert response.call_id == request.call_id
        assert response.get("cseq") == request.get("cseq")


@pytest.mark.parametrize("name", sorted(CASES))
def test_rfc4475_message_retransmitted(harness, name):
    """The same datagram twice (UDP retransmission): still nothing raises, and the second
    copy gets at most the last answer again."""
    data, _ = CASES[name]
    first = harness.feed(data)
    again = harness.feed(data)
    assert len(again) <= 1
    if again and first:
        assert again[0].status == first[-1].status


def test_dblreq_answers_only_the_register(harness):
    """3.1.1.8: the INVITE after the REGISTER's empty body is noise and must be ignored."""
    responses = harness.feed(DBLREQ)
    assert len(responses) == 1
    assert responses[0].call_id == "dblreq.0ha0isndaksdj99sdfafnl3lk233412"
    assert responses[0].get("cseq") == "8 REGISTER"
    assert harness.calls.calls == {}


def test_bext01_lists_what_is_unsupported(harness):
    """3.3.5: acting as a UAS, the Require options are unsupported, Proxy-Require ignored."""
    (response,) = harness.feed(BEXT01)
    assert response.status == 420
    listed = [x.strip() for x in (response.get("unsupported") or "").split(",")]
    assert listed == ["nothingSupportsThis", "nothingSupportsThisEither"]


def test_wsinv_answer_keeps_every_via(harness):
    """3.1.1.1: three Via values (one folded, two comma separated in a compact header)."""
    responses = harness.feed(WSINV)
    assert [r.status for r in responses] in ([100, 481], [100, 480])
    for response in responses:
        vias = response.get_all("via")
        assert len(vias) == 3
        assert "192.0.2.2" in vias[0] and branch_of(vias[0]) == "390skdjuw"
        assert "spindle.example.com" in vias[1] and "192.168.255.111" in vias[2]
        assert response.get("call-id") == "wsinv.ndaksdj@192.0.2.1"


def test_unknown_method_is_not_mistaken_for_register(harness):
    """3.1.1.5: RE%47IST%45R is not REGISTER; the answer's Allow says what is allowed."""
    (response,) = harness.feed(ESC02)
    assert response.status in (405, 501)
    assert "RE%47IST%45R" not in (response.get("allow") or "")
    assert response.get("cseq") == "29344 RE%47IST%45R"


def test_responses_are_never_answered(harness):
    """3.1.1.12/13, 3.1.2.5/19, 3.3.10: responses without a transaction are dropped."""
    for data in (UNREASON, NOREASON, SCALARLG, BIGCODE, BCAST):
        assert harness.feed(data) == []
    assert harness.sent == []


def test_every_message_in_one_bridge(harness):
    """All of RFC 4475 through one bridge, in order, twice: no state carried from one
    message breaks the next."""
    for _ in range(2):
        for name in sorted(CASES):
            harness.feed(CASES[name][0])
        harness.now += 40.0
        harness.timer(harness.now)


# --- TCP framing ----------------------------------------------------------------------------

def test_framer_truncated_stream_yields_nothing():
    framer = StreamFramer()
    assert framer.feed(ESC01[:-1]) == []
    whole = StreamFramer()
    for i in range(len(ESC01) - 1):  # one octet at a time, never the last
        assert whole.feed(ESC01[i:i + 1]) == []
    assert whole.feed(ESC01[-1:]) == [ESC01]


def test_framer_headers_cut_short_yield_nothing():
    framer = StreamFramer()
    head = ESC01.partition(b"\r\n\r\n")[0]
    assert framer.feed(head) == []
    assert framer.feed(b"\r\n") == []


def test_framer_clerr_waits_for_the_rest():
    """3.1.2.2: over a stream there is nothing to do but wait for more data."""
    assert StreamFramer().feed(CLERR) == []


def test_framer_oversize_content_length_raises():
    framer = StreamFramer()
    too_big = ESC01.replace(b"Content-Length: 150", f"Content-Length: {MAX_MESSAGE}".encode())
    with pytest.raises(SipError):
        framer.feed(too_big)


def test_framer_negative_content_length_raises():
    """3.1.2.3: over TCP the framing error is not recoverable."""
    with pytest.raises(SipError):
        StreamFramer().feed(NCL)


def test_framer_multiple_content_lengths_raise():
    """3.3.9 (mcl01): "If a request like this arrives over TCP, the framing error is not
    recoverable, and the connection should be closed": no message may be cut out of it by
    either length (fed an octet at a time, as a slow stream would)."""
    framer = StreamFramer()
    framed: list[bytes] = []
    with pytest.raises(SipError):
        for i in range(len(MCL01)):
            framed += framer.feed(MCL01[i:i + 1])
    assert framed == [], f"framed by one of the two lengths: {framed}"


def test_framer_skips_crlf_keepalives():
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n") == []  # RFC 5626 ping
    assert framer.feed(b"\r\n") == []  # and pong
    out = framer.feed(b"\r\n\r\n" + ESC01 + b"\r\n" + LWSDISP + b"\r\n\r\n")
    assert out == [ESC01, LWSDISP]
    assert framer.feed(b"\r\n\r\n" * 100) == []
    assert framer.feed(ZEROMF) == [ZEROMF]


def test_framed_messages_through_the_bridge(harness):
    framer = StreamFramer()
    tcp = Peer("tcp", "192.0.2.99", 40000, conn=7)
    messages = framer.feed(b"\r\n\r\n".join([LWSDISP, ESC01, ZEROMF]))
    assert messages == [LWSDISP, ESC01, ZEROMF]
    statuses = []
    for message in messages:
        before = len(harness.sent)
        statuses += [r.status for r in harness.feed(message, peer=tcp, stream=True)]
        assert all(s.peer == tcp for s in harness.sent[before:])
    assert statuses == [200, 100, 480, 200]


# --- fuzz -----------------------------------------------------------------------------------

FUZZ_BASE = sip(
    "INVITE sip:bob@example.com SIP/2.0",
    "Via: SIP/2.0/UDP pc33.example.com:5060;branch=z9hG4bK776asdhds;rport",
    "v: SIP/2.0/TCP proxy.example.com;branch=z9hG4bK2d4790.1",
    "Max-Forwards: 70",
    'To: "Bob" <sip:bob@example.com>',
    'From: "Alice \\"A\\"" <sip:alice@example.com>;tag=1928301774',
    "Call-ID: a84b4c76e66710@pc33.example.com",
    "CSeq: 314159 INVITE",
    "Contact: <sip:alice@pc33.example.com>",
    "Subject: lunch",
    "  and more",
    "Content-Type: application/sdp",
    "Content-Length: 150",
    body=sdp("192.0.2.1"))


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and out:  # flip a byte
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind == 1 and out:  # flip bits
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif kind == 2:  # truncate
            del out[rng.randrange(len(out) + 1):]
        elif kind == 3:  # duplicate a line
            lines = bytes(out).split(b"\r\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            out = bytearray(b"\r\n".join(lines))
        elif kind == 4:  # drop a line
            lines = bytes(out).split(b"\r\n")
            del lines[rng.randrange(len(lines))]
            out = bytearray(b"\r\n".join(lines))
        else:  # insert structural characters
            i = rng.randrange(len(out) + 1)
            out[i:i] = rng.choice([b" ", b"\t", b"\r\n", b"\r\n ", b":", b";", b",", b'"',
                                   b"<", b">", b"\x00", b"\xff", b"%", b"\\", b"=", b"\n"])
    return bytes(out)


def test_fuzz_invite_mutations(harness):
    rng = random.Random(4475)
    problems: list[str] = []
    for n in range(2000):
        data = mutate(FUZZ_BASE, rng)
        before = len(harness.sent)
        harness.now += 0.25
        try:
            harness.receive(data, PEER, harness.now)
        except Exception as exc:  # the point: nothing may escape
            problems.append(f"#{n} raised {exc!r} for {data!r}")
            continue
        for s in harness.sent[before:]:
            try:
                check_response(s.data)
            except (AssertionError, SipError, UnicodeDecodeError) as exc:
                problems.append(f"#{n} answered badly ({exc}) to {data!r}")
        if n % 100 == 99:
            harness.timer(harness.now)
    assert not problems, f"{len(problems)} of 2000:\n" + "\n".join(problems[:10])


def test_fuzz_stream_mutations(harness):
    """Mutated messages over TCP: the framer may refuse a stream (SipError, connection
    closed), nothing else escapes, and what it frames the bridge answers well."""
    rng = random.Random(5626)
    tcp = Peer("tcp", "192.0.2.99", 40001, conn=3)
    problems: list[str] = []
    for n in range(500):
        framer = StreamFramer()
        stream = mutate(FUZZ_BASE, rng) + b"\r\n\r\n" + FUZZ_BASE
        try:
            pos = 0
            while pos < len(stream):
                step = rng.randint(1, 200)
                for message in framer.feed(stream[pos:pos + step]):
                    before = len(harness.sent)
                    harness.now += 0.1
                    harness.receive(message, tcp, harness.now, stream=True)
                    for s in harness.sent[before:]:
                        check_response(s.data)
                pos += step
        except SipError:
            continue
        except Exception as exc:
            problems.append(f"#{n} {exc!r} for {stream!r}")
    assert not problems, f"{len(problems)} of 500:\n" + "\n".join(problems[:10])
