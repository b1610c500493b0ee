//! Test-only key material, generated once with Python `cryptography` (not by the library densepush verifies
//! with), so the unit tests of `keys`, `pem`, `jwk` and `jws` share one set of real keys.

/// RSA private key (PKCS#8), for signing test tokens.
pub const RSA_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDAu9jUjlsPLezd\n\
kegDHjeC87eWz9QfnyxOwrTYAP4MBZW34It0k9vvptth/DWkIAMDxGrrSgfs4gOX\n\
0x1j77Vow1Rr+oep/cAZbCC1mJiCt+9cfQZ6tBbKJ7xE/K+881Lk6EBCzcIr3Rxz\n\
KigX0J7F1J0sCodfImxfeun/kWnKFd5xXHRmnWOHDfRtXFY68EAiUQfY/1StE9fZ\n\
MAn6/LPe5HbkyHGAmiTyZo6AM8w/2fh46ln+TfmLFKyKdY+FPmlGZpx97CQJ3+xS\n\
GcHPyOnEQq68TnClTpmPwz6hu5sS5dQXqfgiKVA45F1iW1cdrmMqjK4xzbkde79M\n\
Nt8NqrwxAgMBAAECggEATp8yjD8IMXCEHDzNfxwf/AkMvvZH66BklDqESEtbVy8e\n\
DLUKXoOEqEYSX23hufKfGDXTgekgw4bNfW1PI3nhMHviH+xC1Fshtp0v2LSHnmeH\n\
Otz7vClj1JKSEDhePj+qdJuzvyythXQ9C1PKqDBf3IbnmNQwtePWfrqm4y0AEUHV\n\
tXmsEr748Q2rogpF6mlwaU8H9I9Jl4Jb1D2521PYDA0BcZzl4BedAwG/LcGoFjS2\n\
nVzCkNpxJKJyl3PR+rA2DN6aV8W6tWG7VHdI+D6EuLStYHAGd54OX76LEm4Saxat\n\
MS6dy5IUcoNFciU1kKxaio8gStykg8ugJI582yeTKwKBgQDxME9NzEPeYS5GVjmU\n\
n6EXMhkwZ2gfCZ7S8otLsIStPWOPsSyCluxT+KYzRdxEvk5BuA/5WqeQfIPVkAiZ\n\
8Rn2HLINGRRUVAsN3y2UOR3UT1GLH4J95vcQ3VkU+Az+jdsvc/cral4JtOPAIdCy\n\
0izg72lAHYnJx2YRGWUtN4g7TwKBgQDMkcjlKLNj99U+3z+ZOXPMSqkeb8iIPqZm\n\
+7lJdAQA+3Tj+m85hYIfJStvJ5+EBZYRHjFbyIfSLq5+TJXhptUL3WoqOUI/5b5q\n\
tMwOpQNBtCWeHNG0PymuXB6rjoFJW8ZBiGyOylzG8+zZvMnwheE5iwuntJr23QJJ\n\
HIuAUwGwfwKBgBErCCoYhSg6MKoPDzA2IKhfB437flzfOW/4ldPAb+FJAmJDEVEG\n\
XzIm++WgbmpyRW3GJVTxkAXn5xZ3lzUmBVwQdNgb1eeex96n6T2oxyfKsZo+lvJR\n\
U3re1q14bqxb+qMpFQoBG0qDlsahYZKpBUrJn+tRbvJvACPtc9dBIbBfAoGBALIs\n\
s9ZsWbrTbCeDmMgjEym3SY+Z+wY30wVVcC963dXhLhE22dM25nusCyWYVEZP+0HT\n\
k1gG082MHS0iFVVh0qOv6Lz3/CzdNLmJ2UVUEf8TIcSSA1BDx1D3KTtxNkgnqAkC\n\
AtNni+E5KW0IErbsVJui8LbUBjjHjCsTsqlFIu6PAoGBAMMwwQ37ReVGIu7J/z2+\n\
hwJlrWPI25k5wMPzNKZR92QlRF6ewY3KMkss39ANjxsWq6JJFmv5uDLqupSeAKUW\n\
2REwt0yIQHOjEyDRuNGhQHhSr6Tcy0bo96fkLTjo/2dLgSb+fWFW6Z+RPPm1jkne\n\
1/sfCFsVDuH22d+P96Yu6wYt\n\
-----END PRIVATE KEY-----\n\
";
/// RSA public key (SPKI).
pub const RSA_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAwLvY1I5bDy3s3ZHoAx43\n\
gvO3ls/UH58sTsK02AD+DAWVt+CLdJPb76bbYfw1pCADA8Rq60oH7OIDl9MdY++1\n\
aMNUa/qHqf3AGWwgtZiYgrfvXH0GerQWyie8RPyvvPNS5OhAQs3CK90ccyooF9Ce\n\
xdSdLAqHXyJsX3rp/5FpyhXecVx0Zp1jhw30bVxWOvBAIlEH2P9UrRPX2TAJ+vyz\n\
3uR25MhxgJok8maOgDPMP9n4eOpZ/k35ixSsinWPhT5pRmacfewkCd/sUhnBz8jp\n\
xEKuvE5wpU6Zj8M+obubEuXUF6n4IilQOORdYltXHa5jKoyuMc25HXu/TDbfDaq8\n\
MQIDAQAB\n\
-----END PUBLIC KEY-----\n\
";
/// P256 private key (PKCS#8), for signing test tokens.
pub const P256_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgaYp2KCFHMmoNvyhv\n\
QALP59qKn6GWGWiw+NGAkWaRWgOhRANCAAQUT8w92vSr07kh9r0OKpOIdrIkuGUc\n\
HyPfKzLwTSek5H/pS4vLJOTWi8wAycxGMW2u5Br5mOjrczs+VUylmXX9\n\
-----END PRIVATE KEY-----\n\
";
/// P256 public key (SPKI).
pub const P256_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEFE/MPdr0q9O5Ifa9DiqTiHayJLhl\n\
HB8j3ysy8E0npOR/6UuLyyTk1ovMAMnMRjFtruQa+Zjo63M7PlVMpZl1/Q==\n\
-----END PUBLIC KEY-----\n\
";
/// P384 private key (PKCS#8), for signing test tokens.
pub const P384_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDAGDuca8fAtlim2i/mz\n\
IkLwsZ7ymgeZ26P4OlXRY0bEPnh6Bd/k40S1dmpAdyqF01uhZANiAAShlC0MrAnE\n\
PNBQZ3vYm517sBY5GmoHtJMXSnEuHx8VkmnHc6Xgvyn7AzCCxTGN45FqfdxoH8nI\n\
YiRoHg4GoRuGMDFLemaAtVT9P//HNPZaIR8XL0QaY/0VvlpyAMxL8DI=\n\
-----END PRIVATE KEY-----\n\
";
/// P384 public key (SPKI).
pub const P384_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEoZQtDKwJxDzQUGd72Jude7AWORpqB7ST\n\
F0pxLh8fFZJpx3Ol4L8p+wMwgsUxjeORan3caB/JyGIkaB4OBqEbhjAxS3pmgLVU\n\
/T//xzT2WiEfFy9EGmP9Fb5acgDMS/Ay\n\
-----END PUBLIC KEY-----\n\
";
/// ED25519 private key (PKCS#8), for signing test tokens.
pub const ED25519_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MC4CAQAwBQYDK2VwBCIEIFb0NQNiXv2Y2AlJJPqUmiawhEddfQBJttjTOMOBJJaS\n\
-----END PRIVATE KEY-----\n\
";
/// ED25519 public key (SPKI).
pub const ED25519_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MCowBQYDK2VwAyEAsZZFOE80Q9V3P5o7Ic/z+PsGkV8BI/AYopdmceMo3Ts=\n\
-----END PUBLIC KEY-----\n\
";
/// A 1024-bit RSA public key: too small for RS256 (RFC 7518 §3.3 requires 2048 bits).
pub const RSA1024_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDXX9U+JSrolnAzihiVcDUoqC8E\n\
gLRsQtdzSDf1jz51KwnBIi7318Ydo2qviFYnjiwUd90o+M+WMky4mhljQ6zuN4o5\n\
4ct6bWgInmaayhNrhyR3d/cQGmdngtHguyJ+Kkn1RToOqZRTHeGPvkRqv8gQckMn\n\
LYC9DhsYq7Np/1rXHwIDAQAB\n\
-----END PUBLIC KEY-----\n\
";
/// A P-521 public key (ES512, which densepush does not support).
pub const P521_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIGbMBAGByqGSM49AgEGBSuBBAAjA4GGAAQBH8C3ABoLTa+2YxbD/30w5RJ8EjHP\n\
axWUYVMUDUyQma0HKJRDLarX7RixHDlCZkIzmQmF6MbvRX0nQFln6FBGFnsA3F1l\n\
2bDl7ZGMdqC/uJyl2IxhWoTT4Y/pUJ9l3jD2hH99lB7ZXmEeaFemd0p6BsHXemGI\n\
MyW6Ofme1qCV90I8qk8=\n\
-----END PUBLIC KEY-----\n\
";
/// The RSA public key as PKCS#1 (`RSA PUBLIC KEY`).
pub const RSA_PUBLIC_PKCS1: &str = "\
-----BEGIN RSA PUBLIC KEY-----\n\
MIIBCgKCAQEAwLvY1I5bDy3s3ZHoAx43gvO3ls/UH58sTsK02AD+DAWVt+CLdJPb\n\
76bbYfw1pCADA8Rq60oH7OIDl9MdY++1aMNUa/qHqf3AGWwgtZiYgrfvXH0GerQW\n\
yie8RPyvvPNS5OhAQs3CK90ccyooF9CexdSdLAqHXyJsX3rp/5FpyhXecVx0Zp1j\n\
hw30bVxWOvBAIlEH2P9UrRPX2TAJ+vyz3uR25MhxgJok8maOgDPMP9n4eOpZ/k35\n\
ixSsinWPhT5pRmacfewkCd/sUhnBz8jpxEKuvE5wpU6Zj8M+obubEuXUF6n4IilQ\n\
OORdYltXHa5jKoyuMc25HXu/TDbfDaq8MQIDAQAB\n\
-----END RSA PUBLIC KEY-----\n\
";
/// The RSA public key as a JWK (RFC 7517), without `kid`.
pub const RSA_JWK: &str = r#"{"kty":"RSA","n":"wLvY1I5bDy3s3ZHoAx43gvO3ls_UH58sTsK02AD-DAWVt-CLdJPb76bbYfw1pCADA8Rq60oH7OIDl9MdY--1aMNUa_qHqf3AGWwgtZiYgrfvXH0GerQWyie8RPyvvPNS5OhAQs3CK90ccyooF9CexdSdLAqHXyJsX3rp_5FpyhXecVx0Zp1jhw30bVxWOvBAIlEH2P9UrRPX2TAJ-vyz3uR25MhxgJok8maOgDPMP9n4eOpZ_k35ixSsinWPhT5pRmacfewkCd_sUhnBz8jpxEKuvE5wpU6Zj8M-obubEuXUF6n4IilQOORdYltXHa5jKoyuMc25HXu_TDbfDaq8MQ","e":"AQAB"}"#;
/// The P256 public key as a JWK (RFC 7517), without `kid`.
pub const P256_JWK: &str = r#"{"kty":"EC","crv":"P-256","x":"FE_MPdr0q9O5Ifa9DiqTiHayJLhlHB8j3ysy8E0npOQ","y":"f-lLi8sk5NaLzADJzEYxba7kGvmY6OtzOz5VTKWZdf0"}"#;
/// The P384 public key as a JWK (RFC 7517), without `kid`.
pub const P384_JWK: &str = r#"{"kty":"EC","crv":"P-384","x":"oZQtDKwJxDzQUGd72Jude7AWORpqB7STF0pxLh8fFZJpx3Ol4L8p-wMwgsUxjeOR","y":"an3caB_JyGIkaB4OBqEbhjAxS3pmgLVU_T__xzT2WiEfFy9EGmP9Fb5acgDMS_Ay"}"#;
/// The ED25519 public key as a JWK (RFC 7517), without `kid`.
pub const ED25519_JWK: &str =
    r#"{"kty":"OKP","crv":"Ed25519","x":"sZZFOE80Q9V3P5o7Ic_z-PsGkV8BI_AYopdmceMo3Ts"}"#;
